"""A MomentOp list as a Relax module: one `call_tir` per Gaussian operator, weights as constants.

Shapes are static: the batch size is part of the module, so every loop bound is known
to the schedules and to MetaSchedule (which does not tune symbolic shapes); the backend
builds one module per batch size it meets and caches it.

Widths padded to the vector length: a dense layer's outputs are zero-padded to a multiple
of `pad_to` (zero weight columns and biases; the next layer gets zero weight rows for
them), so a 100-wide layer runs as 112 clean 16-lane (or 8-lane) tiles instead of tiles
of 10 or 5 lanes that the CPU splits with shuffles. Padded units carry mean ~0 and
variance 0 through ReLU and are sliced off at the end. Flatten is a Relax reshape (a view
of the row-major buffer), not a copy.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from harness.api import MOMENT_INPUT, MOMENT_OPS, HarnessError, MomentOp
from plugins.backends.tvm import gaussian_ops as g

# The Relax function's name in every module we build; callers look it up by this name.
ENTRY = "main"


def _const(t: torch.Tensor | np.ndarray) -> relax.Constant:
    arr = t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else t
    return relax.const(np.ascontiguousarray(arr, dtype="float32"))


def _need(op: MomentOp, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in op.tensors]
    if missing:
        raise HarnessError(f"MomentOp '{op.op}' lacks tensors {missing}; it needs {list(names)}")
    return [op.tensors[n] for n in names]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _weights(op: MomentOp, transpose: bool, rows: int = 0, cols: int = 0) -> list[relax.Constant]:
    """Mean, E[w^2] and variance of the weights, then bias mean and variance.

    Dense ([in, out] after the transpose): zero-padded to `rows` inputs and `cols` outputs.
    Conv: [in, kh, kw, out], output channels innermost, so a vector of them is one load.
    """
    mean_w, var_w, mean_b, var_b = _need(op, "mean_w", "var_w", "mean_b", "var_b")
    e2 = mean_w * mean_w + var_w
    ws = [mean_w, e2, var_w]
    bs = [mean_b, var_b]
    if not transpose and ws[0].dim() == 4:
        ws = [w.detach().permute(1, 2, 3, 0) for w in ws]
    elif transpose:
        ws = [w.detach().t() for w in ws]
        fan_in, fan_out = ws[0].shape
        pad_in, pad_out = max(0, rows - fan_in), max(0, cols - fan_out)
        if pad_in or pad_out:
            ws = [torch.nn.functional.pad(w, (0, pad_out, 0, pad_in)) for w in ws]
            bs = [torch.nn.functional.pad(b.detach(), (0, pad_out)) for b in bs]
    return [*(_const(w) for w in ws), *(_const(b) for b in bs)]


def _check_first(op: MomentOp, deterministic: bool) -> None:
    first = bool(op.attrs.get("first", False))
    if first and not deterministic:
        raise HarnessError(f"MomentOp '{op.op}' says first=True but its input carries variance")


def _flat_shape(x: relax.Expr) -> list[int]:
    batch, *rest = _shape(x)
    return [batch, int(np.prod(rest))]


def _shape(x: relax.Expr) -> list[int]:
    return [int(d) for d in x.ty.shape]


def _emit_op(
    bb: relax.BlockBuilder,
    op: MomentOp,
    m: relax.Expr,
    v: relax.Expr | None,
    pad_to: int,
    pair: bool = True,
):
    """Emit one operator; returns the new (mean, variance) Relax values."""
    name = op.op
    if name == "dense":
        _check_first(op, v is None)
        fan_out = int(_need(op, "mean_w")[0].shape[0])
        rows, cols = _shape(m)[-1], _round_up(fan_out, pad_to)
        args = _weights(op, transpose=True, rows=rows, cols=cols)
        fn = lambda m, v, *w: g.dense(m, v, *w, pair=pair)  # noqa: E731
    elif name == "conv2d":
        _check_first(op, v is None)
        args = _weights(op, transpose=False)
        stride, padding = int(op.attrs.get("stride", 1)), int(op.attrs.get("padding", 0))
        fn = lambda m, v, *w: g.conv2d(m, v, *w, stride=stride, padding=padding, pair=pair)  # noqa: E731
    elif name == "relu":
        args, fn = [], g.relu
    elif name in ("maxpool2d", "avgpool2d"):
        kernel = int(op.attrs["kernel"])
        stride = int(op.attrs.get("stride", kernel))
        pool = g.maxpool2d if name == "maxpool2d" else g.avgpool2d
        args = []
        fn = lambda m, v: pool(m, v, kernel, stride)  # noqa: E731
    elif name == "batchnorm":
        width = _shape(m)[1]
        args = [
            _const(torch.nn.functional.pad(t.detach(), (0, width - t.shape[0])))
            for t in _need(op, "scale", "shift")
        ]
        fn = g.batchnorm
    elif name == "flatten":
        flat = [_shape(m)[0], -1]
        out_m = bb.emit(relax.op.reshape(m, flat))
        return out_m, None if v is None else bb.emit(relax.op.reshape(v, flat))
    else:
        raise HarnessError(f"unknown MomentOp '{name}'; valid: {', '.join(MOMENT_OPS)}")
    return _emit_pair(bb, fn, name, m, v, args)


def _emit_add(bb: relax.BlockBuilder, a: tuple, b: tuple):
    """Residual add: means add, variances add (independent branches, the mean-field
    assumption of harness.moments.add). Dense outputs may be zero-padded to different
    widths; padded units are exactly 0 with variance 0, so the narrower side is padded."""
    (m1, v1), (m2, v2) = a, b
    w1, w2 = _shape(m1)[-1], _shape(m2)[-1]
    if w1 != w2 and len(_shape(m1)) == 2:
        pad = lambda t, n: bb.emit(relax.op.nn.pad(t, [0, 0, 0, n]))  # noqa: E731
        if w1 < w2:
            m1, v1 = pad(m1, w2 - w1), None if v1 is None else pad(v1, w2 - w1)
        else:
            m2, v2 = pad(m2, w1 - w2), None if v2 is None else pad(v2, w1 - w2)
    m = bb.emit(relax.op.add(m1, m2))
    if v1 is None or v2 is None:
        return m, v2 if v1 is None else v1
    return m, bb.emit(relax.op.add(v1, v2))


def _emit_pair(bb, fn, name, m, v, args):
    """emit_te with an optional variance: TE sees None, Relax sees one argument fewer."""
    if v is None:
        probe = {}

        def te_fn(m_te, *w):
            out_m, out_v = fn(m_te, None, *w)
            probe["det"] = out_v is None
            return out_m if out_v is None else [out_m, out_v]

        out = bb.emit_te(te_fn, m, *args, primfunc_name_hint=name)
    else:
        probe = {"det": False}

        def te_fn(m_te, v_te, *w):
            return list(fn(m_te, v_te, *w))

        out = bb.emit_te(te_fn, m, v, *args, primfunc_name_hint=name)
    if probe["det"]:
        return out, None
    return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))


def _logical_width(ops: list[MomentOp]) -> int | None:
    """The output width of the last dense layer when it is the last layer that sets one."""
    for op in reversed(ops):
        if op.op == "dense":
            return int(_need(op, "mean_w")[0].shape[0])
        if op.op in ("conv2d", "flatten", "maxpool2d", "avgpool2d"):
            return None
    return None


def to_relax(
    ops: list[MomentOp], input_shape: tuple[int, ...], pad_to: int = 1, pair: bool = True
) -> tvm.IRModule:
    """The program for a deterministic input of `input_shape` (batch first).

    pad_to: the vector length that dense widths are padded to (1: no padding).
    pair: the mean and variance of a dense or conv as one two-output reduction (what the
    hand schedules tile); False gives two plain sums, which MetaSchedule can tile.
    """
    if not ops:
        raise HarnessError("the moment program is empty")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([int(d) for d in input_shape], "float32"))
    with bb.function(ENTRY, [x]):
        # MomentOp.inputs: an op without them takes the previous output (a chain).
        env, last = {MOMENT_INPUT: (x, None)}, MOMENT_INPUT
        for i, op in enumerate(ops):
            args = [env[n] for n in op.inputs] if op.inputs else [env[last]]
            last = op.name or f"%{i}"
            if op.op == "add":
                env[last] = _emit_add(bb, *args)
            elif op.op == "flatten" and args[0][0].same_as(x):
                # The function's input flattened: a view. Legalized, reshape is a copy
                # kernel (0.18 ms of the MLP's 4.8 at batch 1000). Only here: the memory
                # planner does not follow views, and could reuse a viewed intermediate's
                # storage for a later op's output.
                env[last] = bb.emit(relax.op.memory.view(x, _flat_shape(x))), None
            else:
                env[last] = _emit_op(bb, op, *args[0], pad_to, pair)
        m, v = env[last]
        width = _logical_width(ops)
        if width is not None and _shape(m)[-1] != width:  # drop the padded outputs
            m = bb.emit(relax.op.strided_slice(m, axes=[1], begin=[0], end=[width]))
            if v is not None:
                v = bb.emit(relax.op.strided_slice(v, axes=[1], begin=[0], end=[width]))
        if v is None:  # no op carried variance: the output is deterministic
            v = bb.emit_te(g.zeros_like, m, primfunc_name_hint="zeros")
        out = bb.emit(relax.Tuple([m, v]))
        bb.emit_func_output(out)
    return bb.get()
