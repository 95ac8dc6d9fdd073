"""A MomentOp list as a Relax module: one `call_tir` per Gaussian operator, weights as constants.

Shapes are static: the batch size is part of the module, so every loop bound is known
to the schedules and to MetaSchedule (which does not tune symbolic shapes); the backend
builds one module per batch size it meets and caches it.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from harness.api import MOMENT_OPS, HarnessError, MomentOp
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


def _weights(op: MomentOp, transpose: bool) -> list[relax.Constant]:
    """Mean, E[w^2] and variance of the weights, then bias mean and variance."""
    mean_w, var_w, mean_b, var_b = _need(op, "mean_w", "var_w", "mean_b", "var_b")
    e2 = mean_w * mean_w + var_w
    ws = [mean_w, e2, var_w]
    if transpose:
        ws = [w.t() for w in ws]
    return [*(_const(w) for w in ws), _const(mean_b), _const(var_b)]


def _check_first(op: MomentOp, deterministic: bool) -> None:
    first = bool(op.attrs.get("first", False))
    if first and not deterministic:
        raise HarnessError(f"MomentOp '{op.op}' says first=True but its input carries variance")


def _emit_op(bb: relax.BlockBuilder, op: MomentOp, m: relax.Expr, v: relax.Expr | None):
    """Emit one operator; returns the new (mean, variance) Relax values."""
    name = op.op
    if name == "dense":
        _check_first(op, v is None)
        args, fn = _weights(op, transpose=True), g.dense
    elif name == "conv2d":
        _check_first(op, v is None)
        args = _weights(op, transpose=False)
        stride, padding = int(op.attrs.get("stride", 1)), int(op.attrs.get("padding", 0))
        fn = lambda m, v, *w: g.conv2d(m, v, *w, stride=stride, padding=padding)  # noqa: E731
    elif name == "relu":
        args, fn = [], g.relu
    elif name in ("maxpool2d", "avgpool2d"):
        kernel = int(op.attrs["kernel"])
        stride = int(op.attrs.get("stride", kernel))
        pool = g.maxpool2d if name == "maxpool2d" else g.avgpool2d
        args = []
        fn = lambda m, v: pool(m, v, kernel, stride)  # noqa: E731
    elif name == "batchnorm":
        args, fn = [_const(t) for t in _need(op, "scale", "shift")], g.batchnorm
    elif name == "flatten":
        args, fn = [], g.flatten
    else:
        raise HarnessError(f"unknown MomentOp '{name}'; valid: {', '.join(MOMENT_OPS)}")
    return _emit_pair(bb, fn, name, m, v, args)


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


def to_relax(ops: list[MomentOp], input_shape: tuple[int, ...]) -> tvm.IRModule:
    """The program for a deterministic input of `input_shape` (batch first)."""
    if not ops:
        raise HarnessError("the moment program is empty")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([int(d) for d in input_shape], "float32"))
    with bb.function(ENTRY, [x]):
        m, v = x, None
        for op in ops:
            m, v = _emit_op(bb, op, m, v)
        if v is None:  # no op carried variance: the output is deterministic
            v = bb.emit_te(g.zeros_like, m, primfunc_name_hint="zeros")
        out = bb.emit(relax.Tuple([m, v]))
        bb.emit_func_output(out)
    return bb.get()
