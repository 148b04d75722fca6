"""Numba kernels of the ``numba`` backend (see ``numba_backend.py``).

Every kernel is ``@njit(parallel=True, cache=True, fastmath=False)`` and
loops ``prange`` over *rows* (one row = one (merge, batch element) pair, or
one (node, batch element) pair); the inner loop runs over the H columns of a
gate block and is what LLVM vectorizes.  No kernel reduces across rows, so
results never depend on the thread count or the timing (bitwise
reproducible).

Written for the vectorizer: each row is cut into per-gate slices (indexing
``a[H + k]`` with a runtime ``H`` costs a negative-index check that blocks
vectorization; ``a_g = a[H:2 * H]; a_g[k]`` does not), and each inner loop
touches at most four arrays so LLVM's runtime alias checks stay within its
limit.  A row is a few KiB, so the several short loops over it run from L1.
``error_model="numpy"`` drops Python's ZeroDivisionError branch from float
division (it, too, blocks vectorization); it is not fastmath: IEEE
semantics are kept.

Row layout.  A level of ``w`` merges over a batch of ``B`` has ``R = w * B``
rows, row ``r = j * B + b`` for merge ``j`` and batch element ``b``.  Node
stores are node-major ``(nodes, B, H)``, so row ``(j, b)`` of a node reads
``store[node[j], b, :]``.

Arithmetic runs in the arrays' own dtype: every constant goes through
``_const(array, value)`` so float32 kernels never widen to float64.  The
nonlinearities are written as the reference computes them
(``σ(a) = 0.5 * tanh(0.5 * a) + 0.5``, ops/xp.py).  ``tanh`` in float32 is a
branch-free rational approximation (Eigen's ``generic_fast_tanh_float``,
evaluated with fused multiply-adds: max error 2.7e-7 relative, about 2 ulp)
that LLVM vectorizes; libm's scalar ``tanhf`` is about 20x slower here.  In float64 it is ``math.tanh``
(accurate to the ulp: the float64 backend is the one used to check
gradients).
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


# In-place and out-of-place variants are separate functions on purpose: a
# loop whose destination *may* alias its source gets a runtime overlap check,
# and an exact overlap (in place) sends it down the scalar path.

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
    """Gate activations ``[σ(i), tanh(g), σ(o), σ(f..)]`` of ``a + bias`` into dst."""
    _sigmoid_bias(dst[:H], a[:H], bias[:H])
    _tanh_bias(dst[H:2 * H], a[H:2 * H], bias[H:2 * H])
    _sigmoid_bias(dst[2 * H:], a[2 * H:], bias[2 * H:])


@njit(**_INLINE)
def _gates_inplace(a, bias, H):
    _sigmoid_bias_inplace(a[:H], bias[:H])
    _tanh_bias_inplace(a[H:2 * H], bias[H:2 * H])
    _sigmoid_bias_inplace(a[2 * H:], bias[2 * H:])


@njit(**_INLINE)
def _affine_row(dst, x, W):
    """``dst = x @ W`` for one row with a short x (the leaf input, D features)."""
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
def _gated_c(c, i, g):
    for k in range(c.shape[0]):
        c[k] = i[k] * g[k]


@njit(**_INLINE)
def _add_product(c, f, cp):
    for k in range(c.shape[0]):
        c[k] += f[k] * cp[k]


@njit(**_INLINE)
def _unary_c(c, i, g, f, cp):
    """``c = i * g + f * cp`` (c may alias cp)."""
    for k in range(c.shape[0]):
        ig = i[k] * g[k]
        c[k] = ig + f[k] * cp[k]


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
    """``dc~ = dh * o * (1 - t²) + dc``: the gradient reaching c."""
    one = _const(dct, 1.0)
    for k in range(dct.shape[0]):
        dct[k] = dh[k] * o[k] * (one - t[k] * t[k]) + dc[k]


@njit(**_INLINE)
def _dc_total_c(dct, dh, o, c):
    """``dc~ = dh * o * (1 - tanh(c)²) + dc~`` in place (dct holds dc)."""
    one = _const(dct, 1.0)
    for k in range(dct.shape[0]):
        t = _tanh(c[k])
        dct[k] = dh[k] * o[k] * (one - t * t) + dct[k]


@njit(**_INLINE)
def _d_out_gate_c(o, dh, c):
    one = _const(o, 1.0)
    for k in range(o.shape[0]):
        ok = o[k]
        o[k] = dh[k] * _tanh(c[k]) * (ok * (one - ok))


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
    """``f ← dc~ c_k σ'(f)`` in place and ``dprev = dc~ f`` (may alias dct)."""
    one = _const(f, 1.0)
    for k in range(f.shape[0]):
        fk = f[k]
        d = dct[k]
        f[k] = d * cp[k] * (fk * (one - fk))
        dprev[k] = d * fk


# ------------------------------------------------------------------ gathers
@njit(**_OPTS)
def gather_pair(hs, left, right, batch, X):
    """``X[r] = [hs[left[j], b], hs[right[j], b]]`` for the level's rows."""
    H = hs.shape[2]
    for r in prange(left.shape[0] * batch):
        j = r // batch
        b = r - j * batch
        x = X[r]
        _copy(x[:H], hs[left[j], b])
        _copy(x[H:], hs[right[j], b])


@njit(**_OPTS)
def scatter_nodes(src, nodes, store):
    """``store[nodes[k], b] = src[b, k]`` (nodes distinct)."""
    B, K = src.shape[0], src.shape[1]
    for r in prange(B * K):
        b = r // K
        k = r - b * K
        _copy(store[nodes[k], b], src[b, k])


@njit(**_OPTS)
def copy_answers(store, slots, which, out):
    """``out[b, which[k]] = store[slots[k], b]``: node-major store -> (B, K, H)."""
    B = out.shape[0]
    K = which.shape[0]
    for r in prange(B * K):
        b = r // K
        k = r - b * K
        _copy(out[b, which[k]], store[slots[k], b])


# ---------------------------------------------------------------- LSTM fwd
# With ``keep`` the activations [σ(a_i), tanh(a_g), σ(a_o), σ(a_f..)]
# overwrite the pre-activations in A (the backward cache); without (inference)
# they go to a scratch row and A is only read.  ``ans[j] >= 0`` marks a merge
# that answers output ``ans[j]``: its (h, c) also go to ``ans_h/ans_c[b, ans[j]]``
# straight from the kernel (no second pass over the slots).

@njit(**_OPTS)
def lstm_leaf_fwd(x, W, bias, A, fused, out_h, out_c, out_idx, batch):
    """Leaf encoder: ``c = σ(a_i) tanh(a_g)``, ``h = σ(a_o) tanh(c)``; row
    ``r = t * B + b`` writes node ``out_idx[t]``.  With ``fused`` the
    pre-activations ``x[r] @ W`` are computed here (D is small: no GEMM, no
    (R, 3H) buffer); else ``A`` holds them (a BLAS GEMM) and is overwritten."""
    H = out_h.shape[2]
    R = x.shape[0]
    for ch in prange((R + _CHUNK - 1) // _CHUNK):
        s = np.empty(3 * H, x.dtype)
        for r in range(ch * _CHUNK, min(R, (ch + 1) * _CHUNK)):
            j = r // batch
            b = r - j * batch
            if fused:
                g = s
                _affine_row(g, x[r], W)
            else:
                g = A[r]
            _gates_inplace(g, bias, H)
            c = out_c[out_idx[j], b]
            _gated_c(c, g[:H], g[H:2 * H])
            _h_from_c(out_h[out_idx[j], b], g[2 * H:3 * H], c)


@njit(**_OPTS)
def lstm_merge_fwd(A, bias, cs, left, right, batch, out_h, out_c, out_idx, keep,
                   ans, ans_h, ans_c):
    """Binary merge gates fused with the gather of ``c_l, c_r`` and the
    scatter of ``(h, c)`` to ``out_*[out_idx[j], b]``."""
    H = out_h.shape[2]
    R = A.shape[0]
    for ch in prange((R + _CHUNK - 1) // _CHUNK):
        s = np.empty(A.shape[1], A.dtype)
        for r in range(ch * _CHUNK, min(R, (ch + 1) * _CHUNK)):
            j = r // batch
            b = r - j * batch
            a = A[r]
            if keep:
                _gates_inplace(a, bias, H)  # i, g, o, f_l, f_r
                g = a
            else:
                _gates_into(s, a, bias, H)
                g = s
            c = out_c[out_idx[j], b]
            _gated_c(c, g[:H], g[H:2 * H])
            _add_product(c, g[3 * H:4 * H], cs[left[j], b])
            _add_product(c, g[4 * H:5 * H], cs[right[j], b])
            h = out_h[out_idx[j], b]
            _h_from_c(h, g[2 * H:3 * H], c)
            if ans[j] >= 0:
                _copy(ans_h[b, ans[j]], h)
                _copy(ans_c[b, ans[j]], c)


@njit(**_OPTS)
def lstm_unary_fwd(A, bias, c_prev, batch, out_h, out_c, out_idx, keep, ans, ans_h, ans_c):
    """Unary refinement gates: ``c = σ(a_i) tanh(a_g) + σ(a_f) c_prev``.

    ``out_c`` may be ``c_prev`` itself (row r reads and writes only row r).
    """
    H = out_h.shape[2]
    R = A.shape[0]
    for ch in prange((R + _CHUNK - 1) // _CHUNK):
        s = np.empty(A.shape[1], A.dtype)
        for r in range(ch * _CHUNK, min(R, (ch + 1) * _CHUNK)):
            j = r // batch
            b = r - j * batch
            a = A[r]
            if keep:
                _gates_inplace(a, bias, H)  # i, g, o, f
                g = a
            else:
                _gates_into(s, a, bias, H)
                g = s
            c = out_c[out_idx[j], b]
            _unary_c(c, g[:H], g[H:2 * H], g[3 * H:4 * H], c_prev[r])
            h = out_h[out_idx[j], b]
            _h_from_c(h, g[2 * H:3 * H], c)
            if ans[j] >= 0:
                _copy(ans_h[b, ans[j]], h)
                _copy(ans_c[b, ans[j]], c)


# Recomputation for backward: the cells between layers and the leaf gates
# are not cached.  The same row helpers as the forward, in the same order,
# so the recomputed values are bitwise the forward's.

@njit(**_OPTS)
def lstm_leaf_act(x, W, bias, A, fused):
    """The leaf gate activations into ``A`` (no state written); ``A`` holds
    ``x @ W`` already unless ``fused``."""
    H = A.shape[1] // 3
    for r in prange(A.shape[0]):
        a = A[r]
        if fused:
            _affine_row(a, x[r], W)
        _gates_inplace(a, bias, H)


@njit(**_OPTS)
def lstm_merge_c(act, cs, left, right, batch, c_out):
    """``c = i g + f_l c_l + f_r c_r`` from the cached merge activations."""
    H = c_out.shape[1]
    for r in prange(act.shape[0]):
        j = r // batch
        b = r - j * batch
        a = act[r]
        c = c_out[r]
        _gated_c(c, a[:H], a[H:2 * H])
        _add_product(c, a[3 * H:4 * H], cs[left[j], b])
        _add_product(c, a[4 * H:5 * H], cs[right[j], b])


@njit(**_OPTS)
def lstm_unary_c(act, c_prev, c_out):
    """``c = i g + f c_prev`` from the cached unary activations."""
    H = c_out.shape[1]
    for r in prange(act.shape[0]):
        a = act[r]
        _unary_c(c_out[r], a[:H], a[H:2 * H], a[3 * H:4 * H], c_prev[r])


# ---------------------------------------------------------------- LSTM bwd
# Each backward kernel overwrites the cached activations with dA, the
# gradient of the pre-activations in the same block layout (docs/backward.md
# section 2): the cache is dead after its level's backward, and the in-place
# write saves a (R, 5H) buffer and a pass over memory.  Per-row temporaries
# (tanh(c), dc~) live in output rows that are written last.

@njit(**_OPTS)
def lstm_leaf_bwd(act, c, dh, dc):
    """Leaf backward, in place: ``act`` (R, 3H) becomes dA; ``dc`` (dead
    afterwards) holds dc~.  tanh(c) is evaluated twice instead of stored."""
    H = c.shape[1]
    for r in prange(act.shape[0]):
        a = act[r]
        dct = dc[r]
        _dc_total_c(dct, dh[r], a[2 * H:3 * H], c[r])
        _d_out_gate_c(a[2 * H:3 * H], dh[r], c[r])
        _d_input_gates(a[:H], a[H:2 * H], dct)


@njit(**_OPTS)
def lstm_unary_bwd(act, c_out, c_prev, act_prev, dh, dc, dc_prev, h_prev):
    """Unary layer backward, in place (``act`` (R, 4H) becomes dA).

    Writes ``dc_prev = dc~ * f`` and recomputes the layer's input
    ``h_prev = o_prev * tanh(c_prev)`` (``o_prev`` from the layer below's
    activations) for the dW GEMM.
    """
    H = c_out.shape[1]
    for r in prange(act.shape[0]):
        a = act[r]
        t = h_prev[r]     # tanh(c), until h_prev is written
        dct = dc_prev[r]  # dc~, until dc_prev is written
        _tanh_into(t, c_out[r])
        _dc_total(dct, dh[r], a[2 * H:3 * H], t, dc[r])
        _d_out_gate(a[2 * H:3 * H], dh[r], t)
        _d_input_gates(a[:H], a[H:2 * H], dct)
        _d_forget_gate(a[3 * H:4 * H], dct, dct, c_prev[r])
        _h_from_c(t, act_prev[r, 2 * H:3 * H], c_prev[r])


@njit(**_OPTS)
def lstm_merge_bwd(act, c_out, hs, cs, left, right, batch, dh, dc, dcl, dcr, X):
    """Binary merge backward, in place (``act`` (R, 5H) becomes dA).

    Gathers the operands again from the node stores (``c_l, c_r`` for the
    forget gates, ``X = [h_l, h_r]`` for the dW GEMM) instead of caching
    them, and writes the per-row cell gradients ``dcl``, ``dcr``.
    """
    H = c_out.shape[1]
    for r in prange(act.shape[0]):
        j = r // batch
        b = r - j * batch
        a = act[r]
        t = dcr[r]    # tanh(c), until dcr is written
        dct = dcl[r]  # dc~, until dcl is written
        _tanh_into(t, c_out[r])
        _dc_total(dct, dh[r], a[2 * H:3 * H], t, dc[r])
        _d_out_gate(a[2 * H:3 * H], dh[r], t)
        _d_input_gates(a[:H], a[H:2 * H], dct)
        _d_forget_gate(a[4 * H:5 * H], dcr[r], dct, cs[right[j], b])
        _d_forget_gate(a[3 * H:4 * H], dct, dct, cs[left[j], b])
        x = X[r]
        _copy(x[:H], hs[left[j], b])
        _copy(x[H:], hs[right[j], b])


# ----------------------------------------------------------------- RNN
@njit(**_INLINE)
def _bias_act(dst, a, bias, relu):
    zero = _const(a, 0.0)
    if relu:
        for k in range(dst.shape[0]):
            dst[k] = max(a[k] + bias[k], zero)
    else:
        for k in range(dst.shape[0]):
            dst[k] = a[k] + bias[k]


@njit(**_OPTS)
def bias_act_inplace(A, bias, relu):
    """``A = A + bias``, rectified if ``relu``, in place."""
    for r in prange(A.shape[0]):
        _bias_act(A[r], A[r], bias, relu)


@njit(**_OPTS)
def bias_act_rows(A, bias, relu, out, out_idx, batch):
    """``out[out_idx[j], b] = A[r] + bias`` (rectified if ``relu``): inference scatter."""
    for r in prange(A.shape[0]):
        j = r // batch
        b = r - j * batch
        _bias_act(out[out_idx[j], b], A[r], bias, relu)


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
def accumulate_hc(dX, dcl, dcr, batch, targets, ptr, entries, first, dhs, dcs):
    """Operand gradients of one level into the node gradients, race-free.

    Loops over *target nodes* (the level's distinct operands), never over
    consumer rows: for target ``t`` the CSR ``entries[ptr[t]:ptr[t+1]]``
    lists ``2 * j + side`` for every merge ``j`` of the level reading it
    (side 0: left, 1: right), in a fixed order.  ``dX`` (R, 2H) is
    ``d concat(h_l, h_r)``; ``dcl``/``dcr`` (R, H) the cell gradients.
    ``first[t]`` says no gradient has reached the node yet (the store is
    uninitialized there: it is assigned, not added to, so the big gradient
    stores are never zero-filled).
    """
    H = dcl.shape[1]
    for r in prange(targets.shape[0] * batch):
        t = r // batch
        b = r - t * batch
        gh = dhs[targets[t], b]
        gc = dcs[targets[t], b]
        for q in range(ptr[t], ptr[t + 1]):
            e = entries[q]
            row = (e >> 1) * batch + b
            if e & 1:
                src_h = dX[row, H:]
                src_c = dcr[row]
            else:
                src_h = dX[row, :H]
                src_c = dcl[row]
            if q == ptr[t] and first[t]:
                _copy(gh, src_h)
                _copy(gc, src_c)
            else:
                _add(gh, src_h)
                _add(gc, src_c)


@njit(**_OPTS)
def accumulate_h(dX, batch, targets, ptr, entries, first, dhs):
    """``accumulate_hc`` for a state of ``h`` alone (the RNN cell)."""
    H = dhs.shape[2]
    for r in prange(targets.shape[0] * batch):
        t = r // batch
        b = r - t * batch
        gh = dhs[targets[t], b]
        for q in range(ptr[t], ptr[t + 1]):
            e = entries[q]
            row = (e >> 1) * batch + b
            src_h = dX[row, H:] if e & 1 else dX[row, :H]
            if q == ptr[t] and first[t]:
                _copy(gh, src_h)
            else:
                _add(gh, src_h)


# -------------------------------------------------------------------- GEMMs
# BLAS on Numba's threads: each prange iteration makes one *single-threaded*
# BLAS call (Numba's np.dot → scipy.linalg.cython_blas) on its block of rows,
# with the BLAS libraries limited to one thread for the duration of a pass
# (numba_backend.BlasThreads).  One thread pool then does all the work: the
# BLAS library's own workers, which spin for a while after every call, never
# compete with the gate kernels for the cores.  A row of a product is
# computed by the same micro-kernel in the same K order whatever the row
# blocking, so ``gemm_nn``/``gemm_nt`` are bitwise equal to one big GEMM.

@njit(**_OPTS)
def gemm_nn(X, W, out, nblk):
    """``out = X @ W`` in ``nblk`` row blocks."""
    R = X.shape[0]
    step = (R + nblk - 1) // nblk
    for t in prange(nblk):
        r0 = t * step
        r1 = min(R, r0 + step)
        if r1 > r0:
            np.dot(X[r0:r1], W, out[r0:r1])


@njit(**_OPTS)
def gemm_nt(dA, W, out, nblk):
    """``out = dA @ W.T`` in ``nblk`` row blocks (the input gradient)."""
    R = dA.shape[0]
    step = (R + nblk - 1) // nblk
    for t in prange(nblk):
        r0 = t * step
        r1 = min(R, r0 + step)
        if r1 > r0:
            np.dot(dA[r0:r1], W.T, out[r0:r1])


@njit(**_OPTS)
def gemm_tn_acc(dA, X, partial, colsum, nblk, accW, accb, accumulate):
    """``accW (+)= dA^T X`` and ``accb (+)= Σ_r dA`` (weight and bias gradients).

    The row (K) axis is cut into ``nblk`` blocks, a number that depends on
    R only, never on the thread count; the block partials are summed in
    block order: deterministic.  The bias sum rides along with the block's
    GEMM while the block is in cache.
    """
    R = dA.shape[0]
    m = dA.shape[1]
    step = (R + nblk - 1) // nblk
    for t in prange(nblk):
        r0 = t * step
        r1 = min(R, r0 + step)
        cs = colsum[t]
        for k in range(m):
            cs[k] = 0
        if r1 > r0:
            np.dot(dA[r0:r1].T, X[r0:r1], partial[t])
            for r in range(r0, r1):
                _add(cs, dA[r])
        else:
            partial[t][:, :] = 0
    for i in prange(accW.shape[0]):
        row = accW[i]
        if not accumulate:
            _copy(row, partial[0, i])
        else:
            _add(row, partial[0, i])
        for t in range(1, nblk):
            _add(row, partial[t, i])
    if not accumulate:
        _copy(accb, colsum[0])
    else:
        _add(accb, colsum[0])
    for t in range(1, nblk):
        _add(accb, colsum[t])


KERNELS = (
    gather_pair, scatter_nodes, copy_answers, lstm_leaf_fwd, lstm_merge_fwd, lstm_unary_fwd,
    lstm_leaf_act, lstm_merge_c, lstm_unary_c, lstm_leaf_bwd, lstm_unary_bwd, lstm_merge_bwd,
    bias_act_inplace, bias_act_rows, relu_mask,
    accumulate_hc, accumulate_h, gemm_nn, gemm_nt, gemm_tn_acc,
)
