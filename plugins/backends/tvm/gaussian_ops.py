"""Gaussian operators in moment form as TE compute definitions: what is computed, not how.

Each operator maps (mean, variance) tensors to (mean, variance) tensors following the
MomentOp docstring in harness/api.py to the letter; schedules.py decides loop order,
vectorisation and parallelism. A variance of `None` is a deterministic tensor (the
network input), which is what the first-layer shortcut keys on.

Layouts chosen for speed, fixed at lowering time (weights are constants):
dense weights arrive transposed, [in, out], so the output axis is the contiguous one a
schedule vectorises; the variance reduction uses E[w^2] = mean_w^2 + var_w, which turns
(m^2 + v) var_w + v mean_w^2 into m^2 var_w + v E[w^2] (three products per weight for
the whole mean/variance pair instead of four).
"""

from __future__ import annotations

import math

from tvm import te, tirx

Pair = tuple[te.Tensor, te.Tensor | None]

# Numerical conventions of the PyTorch PFP (plugins/methods/pfp/ops.py), mirrored: every
# returned variance is clamped to [0, VAR_MAX]; standard deviations are sqrt(max(v, TINY));
# standardised scores are clipped to [-Z_MAX, Z_MAX], so at sigma -> 0 ReLU and max reduce
# to their deterministic versions; variances use the cancellation-free form
# v1 Phi + v2 Phi(-z) + s^2 (z^2 Phi Phi(-z) + z phi (Phi(-z) - Phi) - phi^2).
VAR_MAX = 1e30
TINY = 1.1754943508222875e-38  # float32's smallest normal number, torch.finfo().tiny
Z_MAX = 40.0

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _f32(x: float) -> tirx.PrimExpr:
    return tirx.const(x, "float32")


def _clamp(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return te.min(te.max(v, _f32(0.0)), _f32(VAR_MAX))


def _pair_sum() -> te.CommReducer:
    """A two-accumulator sum: mean and variance share one pass over the reduction axis."""

    def combine(x, y):
        return x[0] + y[0], x[1] + y[1]

    def identity(t0, t1):
        return tirx.const(0, t0), tirx.const(0, t1)

    return te.comm_reducer(combine, identity, name="pair_sum")


PAIR_SUM = _pair_sum()


def _moments(shape, terms, axis, name: str, pair: bool) -> tuple[te.Tensor, te.Tensor]:
    """The mean and variance sums of a dense or conv: one reduction with two accumulators
    (pair, for the hand schedules), or two plain sums. MetaSchedule's multi-level tiling
    takes only blocks with one output (`NeedsMultiLevelTiling`): given the pair, its
    space for a dense was parallel/vectorise/unroll choices alone (22.5 GFLOP/s at best,
    the hand tile 109)."""
    if pair:
        return te.compute(shape, lambda *i: PAIR_SUM(terms(*i), axis=axis), name=name)
    mean = te.compute(shape, lambda *i: te.sum(terms(*i)[0], axis=axis), name=f"{name}_mean")
    var = te.compute(shape, lambda *i: te.sum(terms(*i)[1], axis=axis), name=f"{name}_var")
    return mean, var


def _horner(x, coeffs: tuple[float, ...]):
    out = _f32(coeffs[0])
    for c in coeffs[1:]:
        out = out * x + _f32(c)
    return out


# Numerical Recipes' erfcc (W. J. Cody's form): erfc(x) = t exp(-x^2 + P(t)),
# t = 1 / (1 + x / 2), x >= 0, fractional error below 1.2e-7 everywhere.
_ERFC_T = (
    0.17087277,
    -0.82215223,
    1.48851587,
    -1.13520398,
    0.27886807,
    -0.18628806,
    0.09678418,
    0.37409196,
    1.00002368,
    -1.26551223,
)
# Cephes' expf: exp(x) = 2^n exp(r), r = x - n ln 2 split in two constants (Cody-Waite).
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)
_EXP_MIN = -87.33654  # ln of float32's smallest normal number: below it exp is 0 here


def _exp(x):
    """exp for x <= 0 as a polynomial times 2^n built from its exponent bits; 0 below
    _EXP_MIN rather than a denormal (slow on x86). LLVM lowers exp and erf to scalar libm
    calls per lane, which stop the vectoriser, and ReLU and Clark's max need them per
    element."""
    c = te.min(te.max(x, _f32(_EXP_MIN)), _f32(0.0))
    n = tirx.floor(c * _f32(1.4426950408889634) + _f32(0.5))
    r = c - n * _f32(0.693359375) - n * _f32(-2.12194440e-4)
    poly = (_horner(r, _EXP_P) * r + _f32(0.5)) * r * r + r + _f32(1.0)
    bits = tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32"))
    return tirx.Select(x < _f32(_EXP_MIN), _f32(0.0), poly * tirx.reinterpret("float32", bits))


def _tail_cdf(z):
    """Phi(-|z|) = erfc(|z| / sqrt 2) / 2, accurate relative to its size deep in the tail,
    where 0.5 (1 + erf(z / sqrt 2)) cancels to 0 or noise (z below about -5.5 in float32);
    torch's ndtr, which the PyTorch PFP uses, keeps the tail the same way."""
    x = te.abs(z) * _INV_SQRT2
    t = 1.0 / (1.0 + 0.5 * x)
    return 0.5 * t * _exp(_horner(t, _ERFC_T) - x * x)


def gauss_stages(z_at, shape, name: str) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """z, Phi(-|z|) and phi(z) as stages of their own, for the moment formulas to read.

    Stages, not expressions: inlined, the erfc and exp polynomials were copied into every
    use of Phi, Phi(-z) and phi in the variance formula, and the expressions grew until
    LeNet took two minutes to compile. Read from a buffer, each is one load.
    """
    z = te.compute(shape, z_at, name=f"{name}_z")
    tail, pdf = te.compute(
        shape,
        lambda *i: [_tail_cdf(z(*i)), _exp(-0.5 * z(*i) * z(*i)) * _INV_SQRT2PI],
        name=f"{name}_tail",
    )
    return z, tail, pdf


def _gauss_terms(z, tail, pdf):
    """Phi(z), Phi(-z) and the spread factor of the cancellation-free variance, from the
    loaded z, tail Phi(-|z|) and pdf: the tail side is the accurate one, the other 1 - it."""
    neg = z < _f32(0.0)
    cdf = tirx.Select(neg, tail, 1.0 - tail)
    cdf_neg = tirx.Select(neg, 1.0 - tail, tail)
    spread = z * z * cdf * cdf_neg + z * pdf * (cdf_neg - cdf) - pdf * pdf
    return cdf, cdf_neg, spread


def _zscore(num, den):
    return te.min(te.max(num / den, _f32(-Z_MAX)), _f32(Z_MAX))


def dense(
    m: te.Tensor, v: te.Tensor | None, w_t, e2_t, var_t, mean_b, var_b, pair: bool = True
) -> Pair:
    """m [B, in]; w_t, e2_t (= mean_w^2 + var_w), var_t: [in, out]; biases [out].

    One reduction with two accumulators: the mean and variance of an output share every
    load of the input. The bias is a separate epilogue stage (TE drops the `init` of a
    tuple reduction), which the schedule computes in the reduction's output tile.
    """
    batch, fan_in = m.shape
    fan_out = w_t.shape[1]
    k = te.reduce_axis((0, fan_in), name="k")
    # m^2 once per input, a stage of its own: squared inside the reduction it was
    # recomputed for every output tile as a scalar multiply and a register broadcast per
    # row and k, which competed with the FMAs for the vector pipes (the first PFP dense
    # at batch 100 ran at half the speed of two plain matmuls); read from memory, the
    # square is a broadcast load folded into the FMA.
    sq = te.compute(m.shape, lambda i, j: m[i, j] * m[i, j], name="dense_sq")
    if v is None:  # first layer: var = x^2 var_w^T + var_b

        def terms(i, j):
            return m[i, k] * w_t[k, j], sq[i, k] * var_t[k, j]
    else:

        def terms(i, j):
            mean = m[i, k] * w_t[k, j]
            return mean, sq[i, k] * var_t[k, j] + v[i, k] * e2_t[k, j]

    name = "dense_first_moments" if v is None else "dense_moments"
    mean, var = _moments((batch, fan_out), terms, k, name, pair)
    out_m = te.compute((batch, fan_out), lambda i, j: mean[i, j] + mean_b[j], name="bias_m")
    out_v = te.compute((batch, fan_out), lambda i, j: _clamp(var[i, j] + var_b[j]), name="bias_v")
    return out_m, out_v


def _pad(x: te.Tensor, pad: int, name: str) -> te.Tensor:
    if pad == 0:
        return x
    n, c, h, w = x.shape
    return te.compute(
        (n, c, h + 2 * pad, w + 2 * pad),
        lambda b, ch, y, z: tirx.if_then_else(
            tirx.all(y >= pad, y < h + pad, z >= pad, z < w + pad),
            x[b, ch, y - pad, z - pad],
            tirx.const(0, x.dtype),
        ),
        name=name,
    )


def conv2d(
    m: te.Tensor,
    v: te.Tensor | None,
    w,
    e2,
    var_w,
    mean_b,
    var_b,
    stride: int,
    padding: int,
    pair: bool = True,
) -> Pair:
    """NCHW input, [in, kh, kw, out] weights (e2 = mean_w^2 + var_w); the dense formulas
    per window. Output channels innermost in the weights: a schedule may vectorise over
    them (whole vectors of channels, one weight load each)."""
    batch, _, height, width = m.shape
    in_c, kh, kw, out_c = w.shape
    oh = (height + 2 * padding - kh) // stride + 1
    ow = (width + 2 * padding - kw) // stride + 1
    pm = _pad(m, padding, "pad_m")
    shape = (batch, out_c, oh, ow)
    rc = te.reduce_axis((0, in_c), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def at(t, b, y, x, c):
        return t[b, c, y * stride + ry, x * stride + rx]

    pv = None if v is None else _pad(v, padding, "pad_v")
    # m^2 once per input value, read as a broadcast like m (see dense_sq): squared in the
    # reduction it was a scalar multiply and a register broadcast per tap and pixel
    sq = te.compute(pm.shape, lambda *i: pm(*i) * pm(*i), name="conv_sq")

    def terms(b, o, y, x):
        xm = at(pm, b, y, x, rc)
        mean = xm * w[rc, ry, rx, o]
        var = at(sq, b, y, x, rc) * var_w[rc, ry, rx, o]
        if pv is not None:
            var = var + at(pv, b, y, x, rc) * e2[rc, ry, rx, o]
        return mean, var

    name = "conv_first_moments" if v is None else "conv_moments"
    mean, var = _moments(shape, terms, [rc, ry, rx], name, pair)
    out_m = te.compute(shape, lambda b, o, y, x: mean[b, o, y, x] + mean_b[o], name="bias_m")
    out_v = te.compute(shape, lambda b, o, y, x: _clamp(var[b, o, y, x] + var_b[o]), name="bias_v")
    return out_m, out_v


def relu(m: te.Tensor, v: te.Tensor | None) -> Pair:
    """Exact moments of max(0, N(m, v)); a deterministic input stays deterministic."""
    if v is None:
        return te.compute(m.shape, lambda *i: te.max(m(*i), tirx.const(0, m.dtype)), "relu"), None

    def sd(*i):
        return te.sqrt(te.max(v(*i), _f32(TINY)))

    z, tail, pdf = gauss_stages(lambda *i: _zscore(m(*i), sd(*i)), m.shape, "relu")

    def moments(*i):
        mean, var = m(*i), v(*i)
        cdf, _, spread = _gauss_terms(z(*i), tail(*i), pdf(*i))
        return [mean * cdf + sd(*i) * pdf(*i), _clamp(var * (cdf + spread))]

    out_m, out_v = te.compute(m.shape, moments, name="relu_gauss")
    return out_m, out_v


def _clark_stage(prev_m: te.Tensor, prev_v: te.Tensor, nm, nv, name: str):
    """Moment match of max(X1, X2) for independent Gaussians (Clark 1961): X1 the fold so
    far (a buffer), X2 the next window element (an index expression)."""
    shape = prev_m.shape

    def total(*i):
        return te.max(prev_v(*i) + nv(*i), _f32(TINY))

    z, tail, pdf = gauss_stages(
        lambda *i: _zscore(prev_m(*i) - nm(*i), te.sqrt(total(*i))), shape, name
    )

    def fold(*i):
        m1, v1, m2, v2 = prev_m(*i), prev_v(*i), nm(*i), nv(*i)
        cdf, cdf_neg, spread = _gauss_terms(z(*i), tail(*i), pdf(*i))
        mean = m1 * cdf + m2 * cdf_neg + te.sqrt(total(*i)) * pdf(*i)
        return [mean, _clamp(v1 * cdf + v2 * cdf_neg + total(*i) * spread)]

    return te.compute(shape, fold, name=name)


def _pool_shape(x: te.Tensor, kernel: int, stride: int) -> tuple:
    n, c, h, w = x.shape
    return (n, c, (h - kernel) // stride + 1, (w - kernel) // stride + 1)


def maxpool2d(m: te.Tensor, v: te.Tensor | None, kernel: int, stride: int) -> Pair:
    """Window folded pairwise in row-major order, one stage per step (no expression blow-up)."""
    shape = _pool_shape(m, kernel, stride)
    if v is None:  # a deterministic input: the plain max, still deterministic
        ry = te.reduce_axis((0, kernel), name="py")
        rx = te.reduce_axis((0, kernel), name="px")
        return te.compute(
            shape,
            lambda b, c, y, x: te.max(m[b, c, y * stride + ry, x * stride + rx], axis=[ry, rx]),
            name="maxpool",
        ), None
    offsets = [(dy, dx) for dy in range(kernel) for dx in range(kernel)]

    def window(t, dy, dx):
        return lambda b, c, y, x: t[b, c, y * stride + dy, x * stride + dx]

    acc_m = te.compute(shape, window(m, *offsets[0]), name="pool_m0")
    acc_v = te.compute(shape, window(v, *offsets[0]), name="pool_v0")
    for step, (dy, dx) in enumerate(offsets[1:], 1):
        nm, nv = window(m, dy, dx), window(v, dy, dx)
        acc_m, acc_v = _clark_stage(acc_m, acc_v, nm, nv, f"pool_max{step}")
    return acc_m, acc_v


def avgpool2d(m: te.Tensor, v: te.Tensor | None, kernel: int, stride: int) -> Pair:
    """Mean of the window; the variance of a mean of independent terms is sum(v) / k^4."""
    shape = _pool_shape(m, kernel, stride)
    inv = 1.0 / (kernel * kernel)

    def avg(t, scale, name):
        ry = te.reduce_axis((0, kernel), name="py")
        rx = te.reduce_axis((0, kernel), name="px")
        return te.compute(
            shape,
            lambda b, c, y, x: te.sum(
                t[b, c, y * stride + ry, x * stride + rx] * scale, axis=[ry, rx]
            ),
            name=name,
        )

    if v is None:
        return avg(m, inv, "avgpool_m"), None
    var = avg(v, inv * inv, "avgpool_v")
    return avg(m, inv, "avgpool_m"), te.compute(shape, lambda *i: _clamp(var(*i)), "avgpool_vc")


def batchnorm(m: te.Tensor, v: te.Tensor | None, scale: te.Tensor, shift: te.Tensor) -> Pair:
    out_m = te.compute(m.shape, lambda b, c, *r: m[(b, c, *r)] * scale[c] + shift[c], "bn_m")
    if v is None:
        return out_m, None
    out_v = te.compute(
        m.shape, lambda b, c, *r: _clamp(v[(b, c, *r)] * scale[c] * scale[c]), "bn_v"
    )
    return out_m, out_v


def flatten(m: te.Tensor, v: te.Tensor | None) -> Pair:
    """Row-major flatten from axis 1, as torch.flatten(x, 1)."""

    def flat(t: te.Tensor) -> te.Tensor:
        dims = [int(d) for d in t.shape[1:]]
        size = math.prod(dims)

        def index(b, f):
            idx, rest = [], f
            for d in reversed(dims):
                idx.append(rest % d)
                rest = rest // d
            return t[(b, *reversed(idx))]

        return te.compute((t.shape[0], size), index, name="flatten")

    return flat(m), None if v is None else flat(v)


def zeros_like(m: te.Tensor) -> te.Tensor:
    return te.compute(m.shape, lambda *i: _f32(0.0), name="zeros")
