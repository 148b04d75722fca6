// treesched forward kernels: the pair gather, a gated or affine layer's
// work after its GEMM, and the answer copy.  The GEMMs themselves
// (A = X @ W) run in cuBLAS, straight into the buffer these kernels finish.
//
// One merge level of a gated cell with L layers, R = width * batch rows:
//   ts_gather_pairs    X = [h(left) | h(right)]                      (R, 2H)
//   cuBLAS             act = X @ merge/w                              (R, (3+N)H)
//   ts_gated_forward   bias, gates, c = i*g + sum_k f_k c_k, h = o tanh(c),
//                      written where the plan says (and to the answers)
//   then per unary layer one GEMM and one ts_gated_forward.
// See common.cuh for the row conventions.

#include "common.cuh"

// out[m * batch + b] = [store[left[m], b] | store[right[m], b]] for the
// width merges of a level: out is (width * batch, 2 * hidden).
extern "C" __global__ void ts_gather_pairs(
    const real* store, const int* left, const int* right, real* out,
    int width, int batch, int hidden)
{
    const index_t total = (index_t)width * batch * 2 * hidden;
    TS_GRID_STRIDE(e, total) {
        const ts_coords at = ts_coords_of(e, 2 * hidden, batch);
        const int side = at.col >= hidden ? 1 : 0;
        const int location = side ? right[at.major] : left[at.major];
        out[e] = store[((index_t)location * batch + at.minor) * hidden + at.col - side * hidden];
    }
}

// One gated layer (N = num_prev gated previous cells, 0..2) over `rows`
// rows, after its GEMM.  act (rows, (3 + N) * hidden) holds X @ W on entry
// and the activations [sigmoid(i), tanh(g), sigmoid(o), sigmoid(f_1..f_N)]
// (with the bias) on exit: the backward's cache, or scratch.  Per element:
//   c = i * g + f_1 * c_1 + f_2 * c_2,   h = o * tanh(c)
// c_k is read from ck_src through ck_idx.  h and c go to row
// ts_row(out_idx, ...) of h_out / c_out (either may be NULL; out_idx NULL =
// the row itself) and, where ans_idx[m] >= 0, to answer ans_idx[m] of ans_h /
// ans_c ((batch, num_answers, hidden)).  c_out may be a cell source of the
// same launch only element for element (each thread reads before it writes).
extern "C" __global__ void ts_gated_forward(
    real* act, const real* bias, int rows, int batch, int hidden, int num_prev,
    const real* c0_src, const int* c0_idx, const real* c1_src, const int* c1_idx,
    real* h_out, real* c_out, const int* out_idx,
    real* ans_h, real* ans_c, const int* ans_idx, int num_answers)
{
    const index_t total = (index_t)rows * hidden;
    const int blocks = 3 + num_prev;
    TS_GRID_STRIDE(e, total) {
        const ts_coords at = ts_coords_of(e, hidden, batch);
        real* gates = act + at.row * blocks * hidden;
        for (int block = 0; block < blocks; ++block) {
            const int column = block * hidden + at.col;
            const real a = gates[column] + bias[column];
            gates[column] = block == 1 ? ts_tanh(a) : ts_sigmoid(a);
        }
        const real c = ts_gated_cell(gates, at, batch, hidden, num_prev,
                                     c0_src, c0_idx, c1_src, c1_idx);
        const real h = gates[2 * hidden + at.col] * ts_tanh(c);
        const index_t out = ts_row(out_idx, at, batch) * hidden + at.col;
        if (h_out) h_out[out] = h;
        if (c_out) c_out[out] = c;
        if (ans_idx) {
            ts_write_answer(ans_h, ans_idx, at, num_answers, hidden, h);
            ts_write_answer(ans_c, ans_idx, at, num_answers, hidden, c);
        }
    }
}

// One affine layer after its GEMM: out (rows, hidden) += bias, rectified if
// relu, in place (the backward's cache or the next layer's input); also
// written to row ts_row(out_idx, ...) of h_out and to the answers as in
// ts_gated_forward, when given.
extern "C" __global__ void ts_affine_forward(
    real* out, const real* bias, int rows, int batch, int hidden, int relu,
    real* h_out, const int* out_idx, real* ans_h, const int* ans_idx, int num_answers)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        const ts_coords at = ts_coords_of(e, hidden, batch);
        real h = out[e] + bias[at.col];
        if (relu && h < (real)0) h = (real)0;
        out[e] = h;
        if (h_out) h_out[ts_row(out_idx, at, batch) * hidden + at.col] = h;
        if (ans_idx) ts_write_answer(ans_h, ans_idx, at, num_answers, hidden, h);
    }
}

// out[b, k] = store[locations[k], b]: out is (batch, num_answers, hidden).
extern "C" __global__ void ts_copy_answers(
    const real* store, const int* locations, int num_answers, int batch, int hidden,
    real* out)
{
    const index_t total = (index_t)batch * num_answers * hidden;
    TS_GRID_STRIDE(e, total) {
        out[e] = store[ts_answer_in_store(e, locations, num_answers, batch, hidden)];
    }
}
