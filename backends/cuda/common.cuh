// treesched CUDA kernels: shared definitions.
//
// Every kernel is compiled twice, once per element type, with
// -DTS_REAL=float or -DTS_REAL=double (see backends/cuda_source.py); the
// kernel names are the same in both modules.  No CUDA headers are included,
// so NVRTC compiles the sources as they are.
//
// Conventions shared by all kernels (the host code relies on them):
//   * matrices are row-major and contiguous.  A *store* is (locations,
//     batch, hidden); a level's rows are a (width * batch, columns) matrix
//     whose row r = m * batch + b belongs to merge m and batch element b;
//   * an index array (int32) maps m to a location: the element of merge m
//     in a store is store[(index[m] * batch + b) * hidden + j].  Where an
//     index may be NULL, NULL means "the launch's own row r";
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

// Where element e of a (majors, minors, width) array sits:
//   e = (major * minors + minor) * width + col,   row = major * minors + minor.
// For a level's rows (width = hidden, minors = batch) major is the merge m
// and minor the batch element b; the answer kernels use it for (b, k) and
// (k, b), the operand accumulation for (target, b).
struct ts_coords {
    index_t row;
    int major;
    int minor;
    int col;
};

__device__ __forceinline__ ts_coords ts_coords_of(index_t e, int width, int minors) {
    ts_coords at;
    at.row = e / width;
    at.col = (int)(e - at.row * width);
    at.major = (int)(at.row / minors);
    at.minor = (int)(at.row - (index_t)at.major * minors);
    return at;
}

// The row of element `at` in a store read through `index`
// (index[m] * batch + b), or the launch's own row when index is NULL.
__device__ __forceinline__ index_t ts_row(const int* index, ts_coords at, int batch) {
    return index ? (index_t)index[at.major] * batch + at.minor : at.row;
}

// c = i * g + f_1 * c_1 + f_2 * c_2 of a gated layer: gates is the row of
// activations [i, g, o, f_1 .. f_N] (N = num_prev), the gated cells c_k are
// read from ck_src through ck_idx.  The forward and the backward's
// recomputation share it, so both give the same bits.
__device__ __forceinline__ real ts_gated_cell(
    const real* gates, ts_coords at, int batch, int hidden, int num_prev,
    const real* c0_src, const int* c0_idx, const real* c1_src, const int* c1_idx)
{
    const int j = at.col;
    real c = gates[j] * gates[hidden + j];
    if (num_prev > 0) c += gates[3 * hidden + j] * c0_src[ts_row(c0_idx, at, batch) * hidden + j];
    if (num_prev > 1) c += gates[4 * hidden + j] * c1_src[ts_row(c1_idx, at, batch) * hidden + j];
    return c;
}

// answers[b, k, j] = value for the answer k = answer_index[m] a level row
// produces (answers laid out (batch, num_answers, hidden); -1: none).
__device__ __forceinline__ void ts_write_answer(
    real* answers, const int* answer_index, ts_coords at, int num_answers, int hidden,
    real value)
{
    const int k = answer_index[at.major];
    if (answers && k >= 0) {
        answers[((index_t)at.minor * num_answers + k) * hidden + at.col] = value;
    }
}

// Element e of the answers (batch, num_answers, hidden) is element
// (locations[k], b, j) of a store: its offset there.
__device__ __forceinline__ index_t ts_answer_in_store(
    index_t e, const int* locations, int num_answers, int batch, int hidden)
{
    const ts_coords at = ts_coords_of(e, hidden, num_answers);  // major b, minor k
    return ((index_t)locations[at.minor] * batch + at.major) * hidden + at.col;
}

#endif  // TREESCHED_COMMON_CUH
