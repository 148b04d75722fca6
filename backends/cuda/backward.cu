// treesched backward kernels: the answers' gradients into the node stores,
// the recomputation of what the forward did not keep, a gated or affine
// layer's backward, and the deterministic accumulation of operand gradients.
// The GEMMs (dX = dA @ W^T, dW^T = dA^T @ X, the bias as ones^T @ dA) run in
// cuBLAS.
//
// Levels run in reverse.  Per level: the layers' backward, top first, each
// turning its cached activations into dA in place; then the operand
// gradients [dh_l | dh_r] (and the cell gradients dc_l, dc_r) of every merge
// are summed per operand node by ts_accumulate_operands, over the plan's
// consumer table in a fixed order, with no atomics: the result does not
// depend on scheduling, and two runs give the same bits.

#include "common.cuh"

// store[locations[k], b] = values[b, k] (values (batch, num_answers, hidden);
// NULL values: 0).  The answer locations are distinct nodes.
extern "C" __global__ void ts_scatter_answers(
    const real* values, const int* locations, int num_answers, int batch, int hidden,
    real* store)
{
    const index_t total = (index_t)batch * num_answers * hidden;
    TS_GRID_STRIDE(e, total) {
        store[ts_answer_in_store(e, locations, num_answers, batch, hidden)] =
            values ? values[e] : (real)0;
    }
}

// Every element of locations[k] (k < count) of a store whose locations hold
// `size` elements each: store[locations[k] * size + i] = 0 (locations
// NULL: location k itself, so count = 1 zeroes the first `size` elements).
extern "C" __global__ void ts_zero_locations(
    real* store, const int* locations, int count, index_t size)
{
    const index_t total = (index_t)count * size;
    TS_GRID_STRIDE(e, total) {
        const index_t k = e / size;
        const index_t location = locations ? (index_t)locations[k] : k;
        store[location * size + (e - k * size)] = (real)0;
    }
}

// c_out (rows, hidden) = i * g + sum_k f_k c_k from a gated layer's cached
// activations act (rows, (3 + num_prev) * hidden): the forward's c, again.
extern "C" __global__ void ts_gated_cells(
    const real* act, int rows, int batch, int hidden, int num_prev,
    const real* c0_src, const int* c0_idx, const real* c1_src, const int* c1_idx,
    real* c_out)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        const ts_coords at = ts_coords_of(e, hidden, batch);
        c_out[e] = ts_gated_cell(act + at.row * (3 + num_prev) * hidden, at, batch, hidden,
                                 num_prev, c0_src, c0_idx, c1_src, c1_idx);
    }
}

// h_out (rows, hidden) = o * tanh(c): the h of a gated layer from its cached
// activations (o is their third block) and its cell c.
extern "C" __global__ void ts_hidden_from_cells(
    const real* act, const real* c, int rows, int hidden, int num_prev, real* h_out)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        const index_t r = e / hidden;
        const index_t j = e - r * hidden;
        h_out[e] = act[(r * (3 + num_prev) + 2) * hidden + j] * ts_tanh(c[e]);
    }
}

// Backward of one gated layer (N = num_prev gated cells) over `rows` rows.
//   act (rows, (3 + N) * hidden): the activations [i, g, o, f_1..f_N] on
//       entry, d loss / d pre-activations dA on exit (in place);
//   c   (rows, hidden): the layer's cell output (tanh(c) is recomputed);
//   ck_src / ck_idx: the gated cells, read as in the forward;
//   dh, dc (rows, hidden): the gradients reaching h and c (dc NULL: zero);
//   dck_out (rows, hidden): receive the gradient of gated cell k.
extern "C" __global__ void ts_gated_backward(
    real* act, const real* c, int rows, int batch, int hidden, int num_prev,
    const real* c0_src, const int* c0_idx, const real* c1_src, const int* c1_idx,
    const real* dh, const real* dc, real* dc0_out, real* dc1_out)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        const ts_coords at = ts_coords_of(e, hidden, batch);
        const int j = at.col;
        real* gates = act + at.row * (3 + num_prev) * hidden;
        const real i = gates[j];
        const real g = gates[hidden + j];
        const real o = gates[2 * hidden + j];
        const real tc = ts_tanh(c[e]);
        // h = o * tanh(c): the total gradient reaching c comes through h and from above
        real dct = dh[e] * o * ((real)1 - tc * tc);
        if (dc) dct += dc[e];
        gates[2 * hidden + j] = dh[e] * tc * (o * ((real)1 - o));
        // c = i * g + sum_k f_k * c_k
        gates[j] = dct * g * (i * ((real)1 - i));
        gates[hidden + j] = dct * i * ((real)1 - g * g);
        if (num_prev > 0) {
            const real f = gates[3 * hidden + j];
            const real ck = c0_src[ts_row(c0_idx, at, batch) * hidden + j];
            gates[3 * hidden + j] = dct * ck * (f * ((real)1 - f));
            dc0_out[e] = dct * f;
        }
        if (num_prev > 1) {
            const real f = gates[4 * hidden + j];
            const real ck = c1_src[ts_row(c1_idx, at, batch) * hidden + j];
            gates[4 * hidden + j] = dct * ck * (f * ((real)1 - f));
            dc1_out[e] = dct * f;
        }
    }
}

// dh (rows, hidden) *= [h > 0] in place: the gradient before a relu, from
// the rectified output h.
extern "C" __global__ void ts_relu_backward(real* dh, const real* h, int rows, int hidden)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        if (!(h[e] > (real)0)) dh[e] = (real)0;
    }
}

// The operand gradients of one level into the node gradient stores
// (locations, batch, hidden).  Thread (t, b, j) owns target node targets[t]
// (the level's operand nodes are distinct) and sums, in the plan's order,
// consumers[consumer_ptr[t] .. consumer_ptr[t + 1]), the operand codes
// 2 * merge + side of the merges reading it:
//   dh: d_pair[merge * batch + b, side * hidden + j]      (d_pair (R, 2H))
//   dc: (side ? dc_right : dc_left)[merge * batch + b, j] (NULL: zero)
// The sum is assigned where first_gradient[t] (the node's first gradient, so
// stores are never zero-filled) and added otherwise.  dc_store NULL: h only.
extern "C" __global__ void ts_accumulate_operands(
    const int* targets, const int* consumer_ptr, const int* consumers,
    const int* first_gradient, int num_targets, int batch, int hidden,
    const real* d_pair, real* dh_store,
    const real* dc_left, const real* dc_right, real* dc_store)
{
    const index_t total = (index_t)num_targets * batch * hidden;
    TS_GRID_STRIDE(e, total) {
        const ts_coords at = ts_coords_of(e, hidden, batch);  // major t, minor b
        real dh = (real)0;
        real dc = (real)0;
        const int stop = consumer_ptr[at.major + 1];
        for (int p = consumer_ptr[at.major]; p < stop; ++p) {
            const int side = consumers[p] & 1;
            const index_t row = (index_t)(consumers[p] >> 1) * batch + at.minor;
            dh += d_pair[(row * 2 + side) * hidden + at.col];
            if (dc_left) dc += (side ? dc_right : dc_left)[row * hidden + at.col];
        }
        const index_t node = ((index_t)targets[at.major] * batch + at.minor) * hidden + at.col;
        if (first_gradient[at.major]) {
            dh_store[node] = dh;
            if (dc_store) dc_store[node] = dc;
        } else {
            dh_store[node] += dh;
            if (dc_store) dc_store[node] += dc;
        }
    }
}
