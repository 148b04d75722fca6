"""Numba kernels of the ``numba`` backend: the executor's primitives (``numba_backend.py``).

The kernels know nothing of a model: each is one primitive of
``treesched.executor.Backend`` (or its elementwise part, after a GEMM) over
*rows*.  A row is one (merge, batch element) pair of a level, or one
(position, batch element) pair of the leaves: row ``r = j * B + b``.  A
*store* is ``(locations, B, H)``; row ``(j, b)`` of a store read through an
index table is ``store[index[j], b, :]``.

The gated layer is ONE kernel for every layer of every gated cell:
``gated_forward`` takes ``num_prev`` (0, 1 or 2 gated previous cells, each a
``(store, index)`` pair) and does the bias, the gate nonlinearities, the cell
update ``c = i g + Σ f_k c_k``, ``h = o tanh(c)``, the writes of ``(h, c)`` to
their stores and of the answers, in one pass over the rows.  When the layer's
input is narrow (the leaf's few features) the projection ``x[r] @ W`` runs
inside the kernel too, so that layer needs no GEMM and no ``(R, blocks * H)``
buffer.  ``gated_backward`` (also by ``num_prev``) turns the activations into
the pre-activation gradients in place and writes the gated cells' gradients;
``gated_cells`` and ``hidden_from_cells`` recompute what the backward does not
cache, with the same row helpers in the same order as the forward, so the
recomputed values are bitwise the forward's.  The affine layer's kernel adds
the bias, rectifies and scatters after its GEMM.  ``accumulate_operands``
sums the operand gradients of a level into the node gradient stores.

Optional arguments are explicit flags with placeholder arrays (the backend's
``no_rows`` / ``no_store`` / ``no_index``), not ``None``: Numba compiles one
specialization per combination of argument types, so ``None`` would multiply
the compiled variants; with flags each kernel compiles once per dtype.  The
flags are tested per row, outside the vectorized loops over the H columns.

Every kernel is ``@njit(parallel=True, cache=True, fastmath=False)`` and
loops ``prange`` over rows (or chunks of ``_CHUNK`` rows sharing one scratch
row); the inner loops run over the H columns of a gate block and are what
LLVM vectorizes.  No kernel reduces across rows in a thread-dependent order
and none uses atomics: results do not depend on the thread count or the
timing (bitwise reproducible).  The operand gradients are summed per target
node over a fixed consumer list (the plan's CSR); the weight gradient's row
axis is split into a number of blocks that depends on the rows only.

Written for the vectorizer: each row is cut into per-gate slices (indexing
``a[H + k]`` with a runtime ``H`` costs a negative-index check that blocks
vectorization; ``a_g = a[H:2 * H]; a_g[k]`` does not), and each inner loop
touches few arrays so LLVM's runtime alias checks stay within its limit.  A
row is a few KiB, so the several short loops over it run from L1; values a
row needs between loops and does not output (the activations in inference,
``tanh(c)``, the gradient reaching ``c``) live in a per-chunk scratch row,
and so does ``c`` when the caller says its output store is also the cell it
gates (a unary layer updating its cell in place).  In-place and out-of-place
helpers are separate functions on purpose: a loop whose destination *may*
alias its source gets a runtime overlap check, and an exact overlap (in
place) sends it down the scalar path.  ``error_model="numpy"`` drops
Python's ZeroDivisionError branch from float division (it, too, blocks
vectorization); it is not fastmath: IEEE semantics are kept.

Arithmetic runs in the arrays' own dtype: every constant goes through
``_const(array, value)`` so float32 kernels never widen to float64.  The
nonlinearities are written as the reference computes them
(``σ(a) = 0.5 * tanh(0.5 * a) + 0.5``, ops/xp.py).  ``tanh`` in float32 is a
branch-free rational approximation (Eigen's ``generic_fast_tanh_float``,
evaluated with fused multiply-adds, about 2 ulp) that LLVM vectorizes, where
libm's scalar ``tanhf`` does not vectorize.  In float64 it is ``math.tanh``
(accurate to the ulp: the float64 backend is the one used to check
gradients).

GEMMs run BLAS on Numba's threads: each ``prange`` iteration makes one
single-threaded BLAS call (Numba's ``np.dot``) on its block of rows, while
the backend limits the BLAS libraries to one thread for the pass
(``numba_backend.BlasThreads``).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

_OPTS = dict(parallel=True, cache=True, fastmath=False, nogil=True, error_model="numpy")
_INLINE = dict(cache=True, fastmath=False, error_model="numpy")


# --------------------------------------------------------------- scalar math
def _const(array, value):  # pragma: no cover - replaced by the overload in jitted code
    return array.dtype.type(value)


@overload(_const)
def _const_overload(array, value):
    if array.dtype == types.float32:
        return lambda array, value: np.float32(value)
    return lambda array, value: np.float64(value)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``, the IEEE-754 fused multiply-add).

    Not a fastmath relaxation: an exactly specified operation, which LLVM
    vectorizes; without fastmath it never contracts ``a * b + c`` itself.
    """
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(fn, args)

    return a(a, b, c), codegen


@njit(**_INLINE)
def _tanh32(x):
    """Eigen's ``generic_fast_tanh_float``: a [13/6] rational on [-7.905, 7.905],
    Horner steps as FMAs (max error 2.7e-7 relative, about 2 ulp)."""
    x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = _fma(x2, np.float32(-2.76076847742355e-16), np.float32(2.00018790482477e-13))
    p = _fma(x2, p, np.float32(-8.60467152213735e-11))
    p = _fma(x2, p, np.float32(5.12229709037114e-08))
    p = _fma(x2, p, np.float32(1.48572235717979e-05))
    p = _fma(x2, p, np.float32(6.37261928875436e-04))
    p = _fma(x2, p, np.float32(4.89352455891786e-03))
    p = p * x
    q = _fma(x2, np.float32(1.19825839466702e-06), np.float32(1.18534705686654e-04))
    q = _fma(x2, q, np.float32(2.26843463243900e-03))
    q = _fma(x2, q, np.float32(4.89352518554385e-03))
    return p / q


def _tanh(x):  # pragma: no cover - replaced by the overload in jitted code
    return math.tanh(x)


@overload(_tanh)
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


# ------------------------------------------------------------ row helpers
_CHUNK = 16  # rows per prange iteration in kernels that need a scratch row


@njit(**_INLINE)
def _sigmoid_bias(dst, a, bias):
    """``dst = σ(a + bias)``, as ``0.5 * tanh(0.5 * x) + 0.5`` (dst distinct from a)."""
    half = _const(a, 0.5)
    for k in range(dst.shape[0]):
        dst[k] = _fma(half, _tanh(half * (a[k] + bias[k])), half)


@njit(**_INLINE)
def _tanh_bias(dst, a, bias):
    for k in range(dst.shape[0]):
        dst[k] = _tanh(a[k] + bias[k])


@njit(**_INLINE)
def _sigmoid_bias_inplace(a, bias):
    half = _const(a, 0.5)
    for k in range(a.shape[0]):
        a[k] = _fma(half, _tanh(half * (a[k] + bias[k])), half)


@njit(**_INLINE)
def _tanh_bias_inplace(a, bias):
    for k in range(a.shape[0]):
        a[k] = _tanh(a[k] + bias[k])


@njit(**_INLINE)
def _gates_into(dst, a, bias, H):
    """Activations ``[σ(i), tanh(g), σ(o), σ(f_1..N)]`` of ``a + bias`` into dst."""
    _sigmoid_bias(dst[:H], a[:H], bias[:H])
    _tanh_bias(dst[H:2 * H], a[H:2 * H], bias[H:2 * H])
    _sigmoid_bias(dst[2 * H:], a[2 * H:], bias[2 * H:])


@njit(**_INLINE)
def _gates_inplace(a, bias, H):
    _sigmoid_bias_inplace(a[:H], bias[:H])
    _tanh_bias_inplace(a[H:2 * H], bias[H:2 * H])
    _sigmoid_bias_inplace(a[2 * H:], bias[2 * H:])


@njit(**_INLINE)
def _project_row(dst, x, W):
    """``dst = x @ W`` for one row with a short x (a few features)."""
    for k in range(dst.shape[0]):
        dst[k] = 0
    for d in range(x.shape[0]):
        xd = x[d]
        w = W[d]
        for k in range(dst.shape[0]):
            dst[k] += xd * w[k]


@njit(**_INLINE)
def _copy(dst, src):
    for k in range(dst.shape[0]):
        dst[k] = src[k]


@njit(**_INLINE)
def _add(dst, src):
    for k in range(dst.shape[0]):
        dst[k] += src[k]


@njit(**_INLINE)
def _zero(dst):
    for k in range(dst.shape[0]):
        dst[k] = 0


@njit(**_INLINE)
def _product(c, i, g):
    for k in range(c.shape[0]):
        c[k] = i[k] * g[k]


@njit(**_INLINE)
def _add_product(c, f, cp):
    for k in range(c.shape[0]):
        c[k] += f[k] * cp[k]


@njit(**_INLINE)
def _cell_update(c, a, H, num_prev, first_cells, first_index, second_cells, second_index,
                 j, b):
    """``c = i g + f_1 c_1 + f_2 c_2`` (the first ``num_prev`` terms) from the
    activations ``a``; ``c`` must not be one of the sources."""
    _product(c, a[:H], a[H:2 * H])
    if num_prev >= 1:
        _add_product(c, a[3 * H:4 * H], first_cells[first_index[j], b])
    if num_prev >= 2:
        _add_product(c, a[4 * H:5 * H], second_cells[second_index[j], b])


@njit(**_INLINE)
def _h_from_c(h, o, c):
    for k in range(h.shape[0]):
        h[k] = o[k] * _tanh(c[k])


@njit(**_INLINE)
def _tanh_into(t, c):
    for k in range(t.shape[0]):
        t[k] = _tanh(c[k])


@njit(**_INLINE)
def _dc_total(dct, dh, o, t, dc):
    """``dc~ = dh * o * (1 - t²) + dc``: the gradient reaching c (t = tanh(c))."""
    one = _const(dct, 1.0)
    for k in range(dct.shape[0]):
        dct[k] = dh[k] * o[k] * (one - t[k] * t[k]) + dc[k]


@njit(**_INLINE)
def _dc_through_h(dct, dh, o, t):
    """``dc~ = dh * o * (1 - t²)``: the gradient reaching c when none comes from above."""
    one = _const(dct, 1.0)
    for k in range(dct.shape[0]):
        dct[k] = dh[k] * o[k] * (one - t[k] * t[k])


@njit(**_INLINE)
def _d_out_gate(o, dh, t):
    """``o ← dh * t * σ'(o)``: the output gate's pre-activation gradient, in place."""
    one = _const(o, 1.0)
    for k in range(o.shape[0]):
        ok = o[k]
        o[k] = dh[k] * t[k] * (ok * (one - ok))


@njit(**_INLINE)
def _d_input_gates(i, g, dct):
    """``i ← dc~ g σ'(i)``, ``g ← dc~ i tanh'(g)``, in place."""
    one = _const(i, 1.0)
    for k in range(i.shape[0]):
        ik = i[k]
        gk = g[k]
        d = dct[k]
        i[k] = d * gk * (ik * (one - ik))
        g[k] = d * ik * (one - gk * gk)


@njit(**_INLINE)
def _d_forget_gate(f, dprev, dct, cp):
    """``f ← dc~ c_k σ'(f)`` in place and ``dprev = dc~ f``: the gated cell's gradient."""
    one = _const(f, 1.0)
    for k in range(f.shape[0]):
        fk = f[k]
        d = dct[k]
        f[k] = d * cp[k] * (fk * (one - fk))
        dprev[k] = d * fk


@njit(**_INLINE)
def _bias_act_inplace(a, bias, relu):
    """``a = a + bias``, rectified if ``relu`` (one array: no overlap check)."""
    zero = _const(a, 0.0)
    if relu:
        for k in range(a.shape[0]):
            a[k] = max(a[k] + bias[k], zero)
    else:
        for k in range(a.shape[0]):
            a[k] = a[k] + bias[k]


# ---------------------------------------------------------- gathers, copies
@njit(**_OPTS)
def gather_pairs(store, left, right, batch, out):
    """``out[r] = [store[left[j], b] | store[right[j], b]]`` for the level's rows."""
    H = store.shape[2]
    for r in prange(left.shape[0] * batch):
        j = r // batch
        b = r - j * batch
        row = out[r]
        _copy(row[:H], store[left[j], b])
        _copy(row[H:], store[right[j], b])


@njit(**_OPTS)
def copy_answers(store, locations, out):
    """``out[b, k] = store[locations[k], b]``: a store's answers -> (B, K, H)."""
    B, K = out.shape[0], out.shape[1]
    for r in prange(B * K):
        b = r // K
        k = r - b * K
        _copy(out[b, k], store[locations[k], b])


@njit(**_OPTS)
def scatter_answers(values, locations, store):
    """``store[locations[k], b] = values[b, k]`` (locations distinct)."""
    B, K = values.shape[0], values.shape[1]
    for r in prange(B * K):
        b = r // K
        k = r - b * K
        _copy(store[locations[k], b], values[b, k])


@njit(**_OPTS)
def zero_locations(store, locations):
    """``store[locations] = 0``."""
    B = store.shape[1]
    for r in prange(locations.shape[0] * B):
        k = r // B
        b = r - k * B
        _zero(store[locations[k], b])


# ---------------------------------------------------------- the gated layer
@njit(**_OPTS)
def gated_forward(X, weight, project_here, act, bias, keep, batch, num_prev,
                  first_cells, first_index, second_cells, second_index,
                  h_out, c_out, out_index, write_h, write_c, c_out_is_a_source,
                  answer_h, answer_c, answer_index, write_answers):
    """One gated layer (``ops.gated``, ``num_prev`` gated cells) over the rows of X.

    The pre-activations are ``X[r] @ weight``, computed here row by row if
    ``project_here`` (a narrow X), else already in ``act`` (a GEMM).  With
    ``keep`` the activations ``[σ(a_i), tanh(a_g), σ(a_o), σ(a_f..)]`` are
    left in ``act`` (the backward's cache); without, they go to a scratch row
    and ``act`` is only read.  Then ``c = i g + Σ f_k c_k`` (cell ``k`` of row
    ``(j, b)`` is ``*_cells[*_index[j], b]``) and ``h = o tanh(c)``, written
    to ``h_out`` / ``c_out[out_index[j], b]`` if ``write_h`` / ``write_c``, and
    to ``answer_h`` / ``answer_c[b, answer_index[j]]`` where that is >= 0 if
    ``write_answers``.  With no output at all only the activations are made.
    ``c_out_is_a_source``: a row of ``c_out`` may be the cell it gates (an
    in-place update); c is then built in a scratch row and copied.
    """
    gates = bias.shape[0]
    H = gates // (3 + num_prev)
    R = X.shape[0]
    states = write_h or write_c or write_answers
    for chunk in prange((R + _CHUNK - 1) // _CHUNK):
        scratch = np.empty(gates + 2 * H, bias.dtype)
        row_gates = scratch[:gates]
        c_scratch = scratch[gates:gates + H]
        h_scratch = scratch[gates + H:]
        c_direct = write_c and not c_out_is_a_source
        for r in range(chunk * _CHUNK, min(R, (chunk + 1) * _CHUNK)):
            if project_here:
                a = act[r] if keep else row_gates
                _project_row(a, X[r], weight)
                _gates_inplace(a, bias, H)
            elif keep:
                a = act[r]
                _gates_inplace(a, bias, H)
            else:  # out of place: the scratch row stays in L1, act is not written back
                a = row_gates
                _gates_into(a, act[r], bias, H)
            if not states:
                continue
            j = r // batch
            b = r - j * batch
            c = c_out[out_index[j], b] if c_direct else c_scratch
            _cell_update(c, a, H, num_prev, first_cells, first_index, second_cells,
                         second_index, j, b)
            if write_c and not c_direct:
                _copy(c_out[out_index[j], b], c)
            if write_h or write_answers:
                h = h_out[out_index[j], b] if write_h else h_scratch
                _h_from_c(h, a[2 * H:3 * H], c)
                if write_answers:
                    k = answer_index[j]
                    if k >= 0:
                        _copy(answer_h[b, k], h)
                        _copy(answer_c[b, k], c)


@njit(**_OPTS)
def gated_cells(act, batch, num_prev, first_cells, first_index, second_cells, second_index,
                c_out, c_out_is_a_source):
    """``c_out[r] = i g + Σ f_k c_k`` from cached activations: the forward's c,
    bitwise (through a scratch row if ``c_out`` may be one of the sources)."""
    H = c_out.shape[1]
    R = act.shape[0]
    for chunk in prange((R + _CHUNK - 1) // _CHUNK):
        c_scratch = np.empty(H, act.dtype)
        for r in range(chunk * _CHUNK, min(R, (chunk + 1) * _CHUNK)):
            j = r // batch
            b = r - j * batch
            c = c_scratch if c_out_is_a_source else c_out[r]
            _cell_update(c, act[r], H, num_prev, first_cells, first_index, second_cells,
                         second_index, j, b)
            if c_out_is_a_source:
                _copy(c_out[r], c)


@njit(**_OPTS)
def hidden_from_cells(act, c, h_out):
    """``h_out[r] = o tanh(c[r])``, ``o`` the output-gate block of ``act``."""
    H = c.shape[1]
    for r in prange(act.shape[0]):
        _h_from_c(h_out[r], act[r, 2 * H:3 * H], c[r])


# Backward: the cached activations become dA, the gradient of the
# pre-activations in the same block layout (docs/backward.md section 2), in
# place: the cache is dead after its level's backward, and the in-place write
# saves a buffer and a pass over memory.

@njit(**_OPTS)
def gated_backward(act, c, batch, num_prev, first_cells, first_index, second_cells,
                   second_index, dh, dc, with_dc, first_dcell, second_dcell):
    """Backward of one gated layer, in place: ``act`` (R, (3 + N) H) becomes dA.

    ``c`` (R, H) is the layer's cell, ``dh`` the gradient reaching h and
    ``dc`` the one reaching c from above (zero unless ``with_dc``); the gated
    cells' gradients ``dc~ f_k`` go to ``first_dcell`` / ``second_dcell``.
    """
    H = c.shape[1]
    R = act.shape[0]
    for chunk in prange((R + _CHUNK - 1) // _CHUNK):
        scratch = np.empty(2 * H, act.dtype)
        t = scratch[:H]      # tanh(c)
        dct = scratch[H:]    # dc~, the total gradient reaching c
        for r in range(chunk * _CHUNK, min(R, (chunk + 1) * _CHUNK)):
            a = act[r]
            o = a[2 * H:3 * H]
            _tanh_into(t, c[r])
            if with_dc:
                _dc_total(dct, dh[r], o, t, dc[r])
            else:
                _dc_through_h(dct, dh[r], o, t)
            _d_out_gate(o, dh[r], t)
            _d_input_gates(a[:H], a[H:2 * H], dct)
            if num_prev >= 1:
                j = r // batch
                b = r - j * batch
                _d_forget_gate(a[3 * H:4 * H], first_dcell[r], dct,
                               first_cells[first_index[j], b])
                if num_prev >= 2:
                    _d_forget_gate(a[4 * H:5 * H], second_dcell[r], dct,
                                   second_cells[second_index[j], b])


# --------------------------------------------------------- the affine layer
@njit(**_OPTS)
def affine_forward(out, bias, relu, batch, h_out, out_index, write_h,
                   answer_h, answer_index, write_answers):
    """After the GEMM ``out = X @ W``: ``out += bias``, rectified if ``relu``, in
    place; also to ``h_out[out_index[j], b]`` if ``write_h`` and to
    ``answer_h[b, answer_index[j]]`` where that is >= 0 if ``write_answers``."""
    for r in prange(out.shape[0]):
        row = out[r]
        _bias_act_inplace(row, bias, relu)
        if write_h or write_answers:
            j = r // batch
            b = r - j * batch
            if write_h:
                _copy(h_out[out_index[j], b], row)
            if write_answers:
                k = answer_index[j]
                if k >= 0:
                    _copy(answer_h[b, k], row)


@njit(**_OPTS)
def relu_mask(dh, h):
    """``dh *= [h > 0]`` in place (relu' from the rectified output)."""
    zero = _const(dh, 0.0)
    for r in prange(dh.shape[0]):
        d = dh[r]
        hr = h[r]
        for k in range(d.shape[0]):
            d[k] = d[k] if hr[k] > zero else zero


# --------------------------------------------------- gradient accumulation
@njit(**_OPTS)
def accumulate_operands(d_pair, batch, targets, consumer_ptr, consumers, first_gradient,
                        dh_store, with_cells, with_cell_gradients, dc_left, dc_right, dc_store):
    """Operand gradients of one level into the node gradient stores, race-free.

    Loops over the level's *target nodes* (its distinct operands), never over
    consumer rows: for target ``t`` the plan's CSR
    ``consumers[consumer_ptr[t]:consumer_ptr[t + 1]]`` lists ``2 * j + side``
    for every merge ``j`` of the level reading it (side 0: left, 1: right),
    in a fixed order.  ``d_pair`` (R, 2H) is ``[dh_l | dh_r]`` per merge row.
    ``first_gradient[t]``: no gradient has reached the node yet (its rows are
    uninitialised: assigned, not added to, so the stores are never
    zero-filled).  With ``with_cells`` the cell store ``dc_store`` gets the
    same from ``dc_left`` / ``dc_right``, or zero contributions without
    ``with_cell_gradients``.
    """
    H = dh_store.shape[2]
    for r in prange(targets.shape[0] * batch):
        t = r // batch
        b = r - t * batch
        node = targets[t]
        start = consumer_ptr[t]
        assign = first_gradient[t]
        gh = dh_store[node, b]
        for q in range(start, consumer_ptr[t + 1]):
            code = consumers[q]
            row = (code >> 1) * batch + b
            source = d_pair[row, H:] if code & 1 else d_pair[row, :H]
            if q == start and assign:
                _copy(gh, source)
            else:
                _add(gh, source)
            if with_cells and with_cell_gradients:
                gc = dc_store[node, b]
                cell_source = dc_right[row] if code & 1 else dc_left[row]
                if q == start and assign:
                    _copy(gc, cell_source)
                else:
                    _add(gc, cell_source)
        if with_cells and not with_cell_gradients and assign:
            _zero(dc_store[node, b])


# -------------------------------------------------------------------- GEMMs
# One thread pool does all the work: the BLAS library's own workers, which
# spin for a while after every call, never compete with the gate kernels for
# the cores.  Above the BLAS library's small-matrix sizes a row of a product
# is computed by the same micro-kernel in the same K order whatever the row
# blocking, so ``gemm_rows`` gives the bits of one big GEMM; the
# backend never cuts blocks below those sizes (``GEMM_MIN_BLOCK_WORK``).

@njit(**_OPTS)
def gemm_rows(X, W, out, blocks, transpose_weight):
    """``out = X @ W`` (``X @ W.T`` with ``transpose_weight``: the input
    gradient) in ``blocks`` row blocks."""
    R = X.shape[0]
    step = (R + blocks - 1) // blocks
    for t in prange(blocks):
        r0 = t * step
        r1 = min(R, r0 + step)
        if r1 > r0:
            if transpose_weight:
                np.dot(X[r0:r1], W.T, out[r0:r1])
            else:
                np.dot(X[r0:r1], W, out[r0:r1])


@njit(**_OPTS)
def gemm_tn_acc(dA, X, partial, colsum, blocks, grad_weight_t, grad_bias, accumulate):
    """``grad_weight_t (+)= dA^T X`` and ``grad_bias (+)= Σ_r dA``.

    The row (K) axis is cut into ``blocks`` blocks, a number that depends on
    R only, never on the thread count; the block partials are summed in
    block order: deterministic.  The bias sum rides along with the block's
    GEMM while the block is in cache.
    """
    R = dA.shape[0]
    m = dA.shape[1]
    step = (R + blocks - 1) // blocks
    for t in prange(blocks):
        r0 = t * step
        r1 = min(R, r0 + step)
        column_sum = colsum[t]
        for k in range(m):
            column_sum[k] = 0
        if r1 > r0:
            np.dot(dA[r0:r1].T, X[r0:r1], partial[t])
            for r in range(r0, r1):
                _add(column_sum, dA[r])
        else:
            partial[t][:, :] = 0
    for i in prange(grad_weight_t.shape[0]):
        row = grad_weight_t[i]
        if not accumulate:
            _copy(row, partial[0, i])
        else:
            _add(row, partial[0, i])
        for t in range(1, blocks):
            _add(row, partial[t, i])
    if not accumulate:
        _copy(grad_bias, colsum[0])
    else:
        _add(grad_bias, colsum[0])
    for t in range(1, blocks):
        _add(grad_bias, colsum[t])


KERNELS = (
    gather_pairs, copy_answers, scatter_answers, zero_locations,
    gated_forward, gated_cells, hidden_from_cells, gated_backward,
    affine_forward, relu_mask, accumulate_operands,
    gemm_rows, gemm_tn_acc,
)
