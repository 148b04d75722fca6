// treesched backward kernels: gate backward fused with the deterministic
// operand-gradient accumulation.  The GEMMs (dX = dA @ W^T per level; the
// weight gradients X^T @ dA once over all levels) run in cuBLAS.
//
// Levels run in reverse.  The top layer of a level does not receive its
// (dh, dc) from a buffer: it sums them per node, in a fixed order, from the
// operand gradients that every consuming merge (all at higher levels, so
// already done) wrote per row into dop (see ts_node_grad in common.cuh).
// Nothing is scattered and no float atomics are used, so the result does not
// depend on scheduling: two runs give bitwise equal gradients.

#include "common.cuh"

// Backward of one N-ary LSTM layer (N = num_prev) over `rows` rows.
//   act     (rows, (3 + N) * hidden): activations [i, g, o, f_1..f_N] on
//           entry, d loss / d pre-activations dA on exit (in place);
//   c_cur   (rows, hidden): this layer's cell output c (tanh(c) is
//           recomputed, not stored);
//   ck_src / ck_idx: the gated previous cells, read as in the forward.
// Incoming gradient, one of two modes:
//   csr_ptr != NULL: accumulate per node (the level's top layer, or the
//           leaves): node = node_base + m, dh from dop_h / dext_h, dc from
//           dop_c / dext_c (see ts_node_grad; dext_* may be NULL);
//   csr_ptr == NULL: dh_in (rows, hidden), dc_in (rows, hidden) or NULL.
// Outgoing gradient of the gated cells: dc_k is written to
//   dcs_out[r * dcs_stride + k * hidden + j]   (dcs_out may be NULL if N = 0)
// e.g. the merge's [dc_l | dc_r] rows of dop_c (stride 2H), or a unary
// layer's dc_prev (stride H; it may alias dc_in element for element).
extern "C" __global__ void ts_lstm_gates_bwd(
    real* act, const real* c_cur, int rows, int batch, int hidden, int num_prev,
    const real* c0_src, const int* c0_idx, const real* c1_src, const int* c1_idx,
    const real* dh_in, const real* dc_in,
    int node_base, const int* csr_ptr, const int* csr_slot,
    const real* dop_h, const real* dop_c,
    const int* ext_idx, const real* dext_h, const real* dext_c, int num_answers,
    real* dcs_out, int dcs_stride)
{
    const index_t total = (index_t)rows * hidden;
    const index_t width = (index_t)(3 + num_prev) * hidden;
    TS_GRID_STRIDE(e, total) {
        const index_t r = e / hidden;
        const int j = (int)(e - r * hidden);
        const int m = (int)(r / batch);
        const int b = (int)(r - (index_t)m * batch);
        real* a = act + r * width;

        real dh;
        real dc;
        if (csr_ptr) {
            const index_t node = (index_t)node_base + m;
            dh = ts_node_grad(node, b, j, batch, hidden, csr_ptr, csr_slot, dop_h,
                              ext_idx, dext_h, num_answers);
            dc = dop_c ? ts_node_grad(node, b, j, batch, hidden, csr_ptr, csr_slot, dop_c,
                                      ext_idx, dext_c, num_answers)
                       : (real)0;
        } else {
            dh = dh_in[e];
            dc = dc_in ? dc_in[e] : (real)0;
        }

        const real i = a[j];
        const real g = a[hidden + j];
        const real o = a[2 * hidden + j];
        const real tc = ts_tanh(c_cur[e]);

        // h = o * tanh(c); total gradient reaching c: from h and from above.
        const real da_o = dh * tc * (o * ((real)1 - o));
        const real dct = dh * o * ((real)1 - tc * tc) + dc;
        // c = i * g + sum_k f_k * c_k
        a[j] = dct * g * (i * ((real)1 - i));
        a[hidden + j] = dct * i * ((real)1 - g * g);
        a[2 * hidden + j] = da_o;
        if (num_prev > 0) {
            const real f = a[3 * hidden + j];
            const real ck = c0_src[ts_row(c0_idx, r, m, b, batch) * hidden + j];
            a[3 * hidden + j] = dct * ck * (f * ((real)1 - f));
            dcs_out[r * dcs_stride + j] = dct * f;
        }
        if (num_prev > 1) {
            const real f = a[4 * hidden + j];
            const real ck = c1_src[ts_row(c1_idx, r, m, b, batch) * hidden + j];
            a[4 * hidden + j] = dct * ck * (f * ((real)1 - f));
            dcs_out[r * dcs_stride + hidden + j] = dct * f;
        }
    }
}

// Backward of one affine RNN layer over `rows` rows: dA = dh * [h > 0]
// (h_cur is the layer's rectified output; NULL = no relu, the leaf layer).
// dh comes from dh_in (rows, hidden) or, when csr_ptr != NULL, is
// accumulated per node as in ts_lstm_gates_bwd.  dA may alias dh_in.
extern "C" __global__ void ts_rnn_act_bwd(
    real* dA, const real* h_cur, int rows, int batch, int hidden,
    const real* dh_in,
    int node_base, const int* csr_ptr, const int* csr_slot, const real* dop_h,
    const int* ext_idx, const real* dext_h, int num_answers)
{
    const index_t total = (index_t)rows * hidden;
    TS_GRID_STRIDE(e, total) {
        const index_t r = e / hidden;
        const int j = (int)(e - r * hidden);
        const int m = (int)(r / batch);
        const int b = (int)(r - (index_t)m * batch);
        real dh;
        if (csr_ptr) {
            dh = ts_node_grad((index_t)node_base + m, b, j, batch, hidden, csr_ptr, csr_slot,
                              dop_h, ext_idx, dext_h, num_answers);
        } else {
            dh = dh_in[e];
        }
        dA[e] = (h_cur == 0 || h_cur[e] > (real)0) ? dh : (real)0;
    }
}
