// treesched forward kernels: gather, fused gate nonlinearities + cell update
// + scatter, and the answer gather.  The GEMMs between them run in cuBLAS.
//
// One merge level of the LSTM cell (num_layers = L) runs as
//   ts_gather_pairs      X0 = [h(left) | h(right)]               (R, 2H)
//   cuBLAS               A0 = X0 @ merge/w                        (R, 5H)
//   ts_lstm_gates_fwd    bias, gates, c = i*g + fl*c_l + fr*c_r, h
//   then per unary layer k: cuBLAS A_k = h @ unary_k/w; ts_lstm_gates_fwd
// with R = level width * batch.  See common.cuh for the row conventions.

#include "common.cuh"

// X[r, :] = [src[left[m] * batch + b, :] | src[right[m] * batch + b, :]]
// for r = m * batch + b, m < width.  X is (width * batch, 2 * hidden).
extern "C" __global__ void ts_gather_pairs(
    const real* src, const int* left, const int* right, real* X,
    int width, int batch, int hidden)
{
    const index_t two_h = 2 * (index_t)hidden;
    const index_t total = (index_t)width * batch * two_h;
    TS_GRID_STRIDE(e, total) {
        const index_t r = e / two_h;
        const int col = (int)(e - r * two_h);
        const int m = (int)(r / batch);
        const int b = (int)(r - (index_t)m * batch);
        const int side = col >= hidden ? 1 : 0;
        const int j = col - side * hidden;
        const int node = side ? right[m] : left[m];
        X[e] = src[((index_t)node * batch + b) * hidden + j];
    }
}

// One N-ary LSTM layer (N = num_prev gated previous cells, 0..2) over
// `rows` rows, after its GEMM.  act (rows, (3 + N) * hidden) holds X @ W on
// entry and the activations [i, g, o, f_1 .. f_N] on exit (the backward's
// cache).  For each element (r, j):
//   c = i * g + f_1 * c_1 + f_2 * c_2,   h = o * tanh(c)
// c_k is read from ck_src at row ts_row(ck_idx, ...).  h and c are written
// (when the pointers are not NULL) at row ts_row(out_idx, ...) of h_out /
// c_out; if ans_idx is given and ans_idx[m] >= 0 they are also written to
// answer k = ans_idx[m] of ans_h / ans_c, laid out (batch, num_answers,
// hidden).  c_out may alias c0_src element for element (in-place update).
extern "C" __global__ void ts_lstm_gates_fwd(
    real* act, const real* bias, int rows, int batch, int hidden, int num_prev,
    const real* c0_src, const int* c0_idx, const real* c1_src, const int* c1_idx,
    real* h_out, real* c_out, const int* out_idx,
    real* ans_h, real* ans_c, const int* ans_idx, int num_answers)
{
    const index_t total = (index_t)rows * hidden;
    const index_t width = (index_t)(3 + num_prev) * hidden;
    TS_GRID_STRIDE(e, total) {
        const index_t r = e / hidden;
        const int j = (int)(e - r * hidden);
        const int m = (int)(r / batch);
        const int b = (int)(r - (index_t)m * batch);
        real* a = act + r * width;

        const real i = ts_sigmoid(a[j] + bias[j]);
        const real g = ts_tanh(a[hidden + j] + bias[hidden + j]);
        const real o = ts_sigmoid(a[2 * hidden + j] + bias[2 * hidden + j]);
        a[j] = i;
        a[hidden + j] = g;
        a[2 * hidden + j] = o;
        real c = i * g;
        if (num_prev > 0) {
            const real f = ts_sigmoid(a[3 * hidden + j] + bias[3 * hidden + j]);
            a[3 * hidden + j] = f;
            c += f * c0_src[ts_row(c0_idx, r, m, b, batch) * hidden + j];
        }
        if (num_prev > 1) {
            const real f = ts_sigmoid(a[4 * hidden + j] + bias[4 * hidden + j]);
            a[4 * hidden + j] = f;
            c += f * c1_src[ts_row(c1_idx, r, m, b, batch) * hidden + j];
        }
        const real h = o * ts_tanh(c);

        const index_t out_row = ts_row(out_idx, r, m, b, batch);
        if (h_out) h_out[out_row * hidden + j] = h;
        if (c_out) c_out[out_row * hidden + j] = c;
        if (ans_idx) {
            const int k = ans_idx[m];
            if (k >= 0) {
                const index_t at = ((index_t)b * num_answers + k) * hidden + j;
                if (ans_h) ans_h[at] = h;
                if (ans_c) ans_c[at] = c;
            }
        }
    }
}

// One affine RNN layer after its GEMM: a = a + bias, rectified if relu,
// written back in place into a (rows, hidden) (the backward's cache and the
// next layer's input), and, when given, to row ts_row(out_idx, ...) of h_out
// and to the answers as in ts_lstm_gates_fwd.
extern "C" __global__ void ts_rnn_act_fwd(
    real* a, const real* bias, int rows, int batch, int hidden, int relu,
    real* h_out, const int* out_idx,
    real* ans_h, const int* ans_idx, int num_answers)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        const index_t r = e / hidden;
        const int j = (int)(e - r * hidden);
        const int m = (int)(r / batch);
        const int b = (int)(r - (index_t)m * batch);
        real v = a[e] + bias[j];
        if (relu && v < (real)0) v = (real)0;
        a[e] = v;
        if (h_out) h_out[ts_row(out_idx, r, m, b, batch) * hidden + j] = v;
        if (ans_idx) {
            const int k = ans_idx[m];
            if (k >= 0 && ans_h) ans_h[((index_t)b * num_answers + k) * hidden + j] = v;
        }
    }
}

// out (batch, num_answers, hidden) = the state rows of the answering nodes:
// out[b, k, :] = store[nodes[k] * batch + b, :].
extern "C" __global__ void ts_gather_answers(
    const real* store, const int* nodes, int num_answers, int batch, int hidden,
    real* out)
{
    const index_t total = (index_t)batch * num_answers * hidden;
    TS_GRID_STRIDE(e, total) {
        const index_t bk = e / hidden;
        const int j = (int)(e - bk * hidden);
        const int b = (int)(bk / num_answers);
        const int k = (int)(bk - (index_t)b * num_answers);
        out[e] = store[((index_t)nodes[k] * batch + b) * hidden + j];
    }
}
