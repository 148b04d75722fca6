// treesched CUDA kernels: shared definitions.
//
// Every kernel is compiled twice, once per element type, with
// -DTS_REAL=float or -DTS_REAL=double (see backends/cuda_source.py); the
// kernel names are the same in both modules.  No CUDA headers are included,
// so NVRTC compiles the sources as they are.
//
// Conventions shared by all kernels (the host code relies on them):
//   * matrices are row-major and contiguous; a "row" is one (node, batch
//     element) pair, row = node * batch + b, so the rows of one schedule
//     level (whose node ids are contiguous) are one contiguous block;
//   * "m" is the node index *within the launch* (the level's merge m, or
//     leaf m), b the batch element: r = m * batch + b;
//   * an optional index array idx (NULL = identity) maps m to the row block
//     of a gathered operand: row = idx[m] * batch + b;
//   * element offsets are 64-bit (R * 5H overflows 32 bits at large T, B);
//   * every kernel is a grid-stride loop over its elements, so any grid size
//     is correct (the host caps the grid);
//   * no atomics: every output element is written by exactly one thread, and
//     every sum runs in a fixed order, so results are bitwise reproducible.

#ifndef TREESCHED_COMMON_CUH
#define TREESCHED_COMMON_CUH

#ifndef TS_REAL
#error "compile with -DTS_REAL=float or -DTS_REAL=double"
#endif

typedef TS_REAL real;
typedef long long index_t;

#define TS_GRID_STRIDE(e, total)                                               \
    for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x;          \
         e < (total); e += (index_t)blockDim.x * gridDim.x)

__device__ __forceinline__ float ts_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double ts_tanh(double x) { return tanh(x); }

// The logistic sigmoid as ops/xp.py computes it: 0.5 * (1 + tanh(x / 2)),
// evaluated as tanh(x * 0.5) * 0.5 + 0.5; it never overflows.
__device__ __forceinline__ real ts_sigmoid(real x) {
    return ts_tanh(x * (real)0.5) * (real)0.5 + (real)0.5;
}

// Row of a gathered operand: idx[m] * batch + b, or the launch row r itself.
__device__ __forceinline__ index_t ts_row(const int* idx, index_t r, int m, int b, int batch) {
    return idx ? (index_t)idx[m] * batch + b : r;
}

// The total gradient reaching state element (node, b, j): the gradient from
// outside (the answers the caller differentiates, dext of shape
// (batch, num_answers, hidden), ext_idx[node] = answer index or -1) plus the
// operand gradients written by every merge that consumed the node.
//
// Consumers come from a CSR over nodes: csr_slot[csr_ptr[node] ..
// csr_ptr[node + 1]) lists operand slots s = 2 * merge + side in ascending
// order (side 0 = left, 1 = right, merge = node id - num_leaves), and dop
// holds, per merge row, [d left (H) | d right (H)].  The sum runs in that
// fixed order: no atomics, deterministic.
__device__ __forceinline__ real ts_node_grad(
    index_t node, int b, int j, int batch, int hidden,
    const int* csr_ptr, const int* csr_slot, const real* dop,
    const int* ext_idx, const real* dext, int num_answers)
{
    real g = (real)0;
    if (ext_idx != 0 && dext != 0) {
        const int k = ext_idx[node];
        if (k >= 0) {
            g = dext[((index_t)b * num_answers + k) * hidden + j];
        }
    }
    const int stop = csr_ptr[node + 1];
    for (int p = csr_ptr[node]; p < stop; ++p) {
        const int s = csr_slot[p];
        const index_t merge_row = (index_t)(s >> 1) * batch + b;
        g += dop[(merge_row * 2 + (s & 1)) * hidden + j];
    }
    return g;
}

#endif  // TREESCHED_COMMON_CUH
