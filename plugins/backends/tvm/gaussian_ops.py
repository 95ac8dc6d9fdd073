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


def _horner(x, coeffs: tuple[float, ...]):
    out = _f32(coeffs[0])
    for c in coeffs[1:]:
        out = out * x + _f32(c)
    return out


# Eigen's float32 erf (as in TVM's topi.fast_erf): x P(x^2) / Q(x^2) on [-4, 4].
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)
# Cephes' expf: exp(x) = 2^n exp(r), r = x - n ln 2 split in two constants (Cody-Waite).
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)


def _erf(x):
    """erf as a rational polynomial, not LLVM's: `erff` and `llvm.exp` are scalar libm
    calls that stop the vectoriser, and ReLU and Clark's max evaluate both per element."""
    x = te.min(te.max(x, _f32(-4.0)), _f32(4.0))
    x2 = x * x
    return x * _horner(x2, _ERF_P) / _horner(x2, _ERF_Q)


def _exp(x):
    """exp for x <= 0 as a polynomial times 2^n built from its exponent bits; 0 below -87."""
    x = te.min(te.max(x, _f32(-87.0)), _f32(0.0))
    n = tirx.floor(x * _f32(1.4426950408889634) + _f32(0.5))
    r = x - n * _f32(0.693359375) - n * _f32(-2.12194440e-4)
    poly = (_horner(r, _EXP_P) * r + _f32(0.5)) * r * r + r + _f32(1.0)
    bits = tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32"))
    return poly * tirx.reinterpret("float32", bits)


def _gauss_terms(z):
    """Phi(z), Phi(-z), phi(z) and the spread factor of the cancellation-free variance."""
    e = _erf(z * _INV_SQRT2)
    cdf = 0.5 * (1.0 + e)
    cdf_neg = 0.5 * (1.0 - e)
    pdf = _exp(-0.5 * z * z) * _INV_SQRT2PI
    spread = z * z * cdf * cdf_neg + z * pdf * (cdf_neg - cdf) - pdf * pdf
    return cdf, cdf_neg, pdf, spread


def _zscore(num, den):
    return te.min(te.max(num / den, _f32(-Z_MAX)), _f32(Z_MAX))


def dense(m: te.Tensor, v: te.Tensor | None, w_t, e2_t, var_t, mean_b, var_b) -> Pair:
    """m [B, in]; w_t, e2_t (= mean_w^2 + var_w), var_t: [in, out]; biases [out].

    One reduction with two accumulators: the mean and variance of an output share every
    load of the input. The bias is a separate epilogue stage (TE drops the `init` of a
    tuple reduction), which the schedule computes in the reduction's output tile.
    """
    batch, fan_in = m.shape
    fan_out = w_t.shape[1]
    k = te.reduce_axis((0, fan_in), name="k")
    if v is None:  # first layer: var = x^2 var_w^T + var_b

        def terms(i, j):
            return m[i, k] * w_t[k, j], m[i, k] * m[i, k] * var_t[k, j]
    else:

        def terms(i, j):
            mean = m[i, k] * w_t[k, j]
            return mean, m[i, k] * m[i, k] * var_t[k, j] + v[i, k] * e2_t[k, j]

    mean, var = te.compute(
        (batch, fan_out),
        lambda i, j: PAIR_SUM(terms(i, j), axis=k),
        name="dense_first_moments" if v is None else "dense_moments",
    )
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
    m: te.Tensor, v: te.Tensor | None, w, e2, var_w, mean_b, var_b, stride: int, padding: int
) -> Pair:
    """NCHW input, OIHW weights (e2 = mean_w^2 + var_w); the dense formulas per window."""
    batch, _, height, width = m.shape
    out_c, in_c, kh, kw = w.shape
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

    def terms(b, o, y, x):
        xm = at(pm, b, y, x, rc)
        mean = xm * w[o, rc, ry, rx]
        var = xm * xm * var_w[o, rc, ry, rx]
        if pv is not None:
            var = var + at(pv, b, y, x, rc) * e2[o, rc, ry, rx]
        return mean, var

    mean, var = te.compute(
        shape,
        lambda b, o, y, x: PAIR_SUM(terms(b, o, y, x), axis=[rc, ry, rx]),
        name="conv_first_moments" if v is None else "conv_moments",
    )
    out_m = te.compute(shape, lambda b, o, y, x: mean[b, o, y, x] + mean_b[o], name="bias_m")
    out_v = te.compute(shape, lambda b, o, y, x: _clamp(var[b, o, y, x] + var_b[o]), name="bias_v")
    return out_m, out_v


def relu(m: te.Tensor, v: te.Tensor | None) -> Pair:
    """Exact moments of max(0, N(m, v)); a deterministic input stays deterministic."""
    if v is None:
        return te.compute(m.shape, lambda *i: te.max(m(*i), tirx.const(0, m.dtype)), "relu"), None

    def moments(*i):
        mean, var = m(*i), v(*i)
        s = te.sqrt(te.max(var, _f32(TINY)))
        cdf, _, pdf, spread = _gauss_terms(_zscore(mean, s))
        return [mean * cdf + s * pdf, _clamp(var * (cdf + spread))]

    out_m, out_v = te.compute(m.shape, moments, name="relu_gauss")
    return out_m, out_v


def _clark(m1, v1, m2, v2):
    """Moment match of max(X1, X2) for independent Gaussians (Clark 1961)."""
    total = te.max(v1 + v2, _f32(TINY))
    a = te.sqrt(total)
    cdf, cdf_neg, pdf, spread = _gauss_terms(_zscore(m1 - m2, a))
    mean = m1 * cdf + m2 * cdf_neg + a * pdf
    return mean, _clamp(v1 * cdf + v2 * cdf_neg + total * spread)


def _pool_shape(x: te.Tensor, kernel: int, stride: int) -> tuple:
    n, c, h, w = x.shape
    return (n, c, (h - kernel) // stride + 1, (w - kernel) // stride + 1)


def _fold_step(prev_m: te.Tensor, prev_v: te.Tensor, nm, nv):
    def fold(b, c, y, x):
        return list(_clark(prev_m[b, c, y, x], prev_v[b, c, y, x], nm(b, c, y, x), nv(b, c, y, x)))

    return fold


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
        fold = _fold_step(acc_m, acc_v, window(m, dy, dx), window(v, dy, dx))
        acc_m, acc_v = te.compute(shape, fold, name=f"pool_max{step}")
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
