"""Gaussian moment propagation in PyTorch: the reference semantics of MomentOp, and the
walk from a network plus a diagonal Gaussian posterior to a MomentOp list.

Part of the API (`from harness.api import moments`) because several plugins build on it:
PFP runs the ops as they are, linearisation swaps the nonlinearities, and backends with
their own Gaussian operators (TVM) mirror these definitions one to one.

Each function maps an activation (mean, var) to the next one, exactly as the MomentOp
docstring in harness/api.py specifies, so another backend (TVM) can mirror them one to one.
`var=None` means "exactly zero" (a deterministic tensor, e.g. the network input): it lets
the first dense/conv layer skip its variance products instead of multiplying by zeros.

Numerical conventions, shared with any backend that mirrors this file:

- every variance an op returns is clamped to [0, VAR_MAX]; VAR_MAX keeps a huge-sigma
  posterior finite (a saturated Gaussian still has a finite mean, so no inf - inf = NaN);
- standard deviations are sqrt(max(v, TINY)): at sigma -> 0 the standardised score z is
  huge, the CDF saturates to exactly 0 or 1 and the PDF to 0, so ReLU and max-pool reduce
  to their deterministic versions (no 0/0) without an epsilon that would bias the mean;
- ReLU and Clark's max share one form through g(z) = z Phi(z) + phi(z):
  mean = m2 + a g, var = v2 + (v1 - v2) Phi(z) + a^2 g (z - g), a = sqrt(v1 + v2),
  z = (m1 - m2) / a (ReLU: m2 = v2 = 0). It is algebraically Clark's, but avoids
  E[x^2] - E[x]^2, which loses every digit when the mean dominates, and needs one CDF.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from harness.api import (
    MOMENT_INPUT,
    MOMENT_OPS,
    HarnessError,
    MomentOp,
    Posterior,
    QuantSpec,
    fake_quant,
    require_finite,
)

Var = Tensor | None
Moments = tuple[Tensor, Var]

VAR_MAX = 1e30
TINY = torch.finfo(torch.float32).tiny
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _clamp(v: Tensor) -> Tensor:
    return v.clamp(0.0, VAR_MAX)


def dense(
    mean: Tensor,
    var: Var,
    mean_w: Tensor,
    var_w: Tensor,
    mean_b: Tensor,
    var_b: Tensor,
    first: bool = False,
) -> Moments:
    """mean = m W^T + b; var = (m^2 + v) var_w^T + v (W^2)^T + var_b (first: v = 0)."""
    out_mean = F.linear(mean, mean_w, mean_b)
    if first or var is None:
        return out_mean, _clamp(F.linear(mean * mean, var_w, var_b))
    out_var = F.linear(mean * mean + var, var_w, var_b) + F.linear(var, mean_w * mean_w)
    return out_mean, _clamp(out_var)


def conv2d(
    mean: Tensor,
    var: Var,
    mean_w: Tensor,
    var_w: Tensor,
    mean_b: Tensor,
    var_b: Tensor,
    first: bool = False,
    stride: int = 1,
    padding: int = 0,
) -> Moments:
    """The dense formulas with convolution in place of the matrix product."""

    def conv(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, b, stride, padding)

    out_mean = conv(mean, mean_w, mean_b)
    if first or var is None:
        return out_mean, _clamp(conv(mean * mean, var_w, var_b))
    out_var = conv(mean * mean + var, var_w, var_b) + conv(var, mean_w * mean_w)
    return out_mean, _clamp(out_var)


def _standard_max(z: Tensor) -> tuple[Tensor, Tensor]:
    """Phi(z) and g(z) = z Phi(z) + phi(z) = E[max(Z + z, 0)] for Z ~ N(0, 1).

    Both ReLU and Clark's max reduce to it: with a the spread and z the standardised gap,
    E[max] = m2 + a g and Var[max] = v2 + (v1 - v2) Phi + a^2 g (z - g). For |z| beyond
    float range of z^2 the PDF is exactly 0 and g is z Phi, so sigma -> 0 needs no special
    case and no epsilon that would bias the mean.
    """
    cdf = torch.special.ndtr(z)
    pdf = torch.exp(z.square().mul(-0.5)).mul(_INV_SQRT_2PI)
    return cdf, torch.addcmul(pdf, z, cdf)


def relu(mean: Tensor, var: Var) -> Moments:
    """Exact moments of max(0, N(m, v)): E = s g(m / s), Var = v (Phi + g (z - g))."""
    if var is None:
        return torch.relu(mean), None
    s = var.clamp_min(TINY).sqrt()
    z = mean / s
    cdf, g = _standard_max(z)
    return s * g, _clamp(var * torch.addcmul(cdf, g, z - g))


def clark_max(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """Moment match of max(X1, X2) for independent Gaussians (Clark 1961)."""
    total = (v1 + v2).clamp_min(TINY)
    a = total.sqrt()
    z = (m1 - m2) / a
    cdf, g = _standard_max(z)
    mean = torch.addcmul(m2, a, g)
    var = torch.addcmul(v2, v1 - v2, cdf).addcmul_(total, g * (z - g))
    return mean, _clamp(var)


def _windows(x: Tensor, kernel: int, stride: int) -> list[Tensor]:
    """The kernel*kernel strided views of a pooling window, in row-major order."""
    rows = (x.shape[-2] - kernel) // stride + 1
    cols = (x.shape[-1] - kernel) // stride + 1
    return [
        x[..., i : i + stride * (rows - 1) + 1 : stride, j : j + stride * (cols - 1) + 1 : stride]
        for i in range(kernel)
        for j in range(kernel)
    ]


def maxpool2d(mean: Tensor, var: Var, kernel: int, stride: int) -> Moments:
    """Max over each window folded pairwise, ((x00 v x01) v x10) v x11, by Clark's match."""
    if var is None:
        return F.max_pool2d(mean, kernel, stride), None
    means, variances = _windows(mean, kernel, stride), _windows(var, kernel, stride)
    m, v = means[0], variances[0]
    for m2, v2 in zip(means[1:], variances[1:], strict=True):
        m, v = clark_max(m, v, m2, v2)
    return m, v


def avgpool2d(mean: Tensor, var: Var, kernel: int, stride: int) -> Moments:
    """Mean of k*k independent inputs: the variance is their average divided by k*k."""
    out_mean = F.avg_pool2d(mean, kernel, stride)
    if var is None:
        return out_mean, None
    return out_mean, _clamp(F.avg_pool2d(var, kernel, stride) / (kernel * kernel))


def batchnorm(mean: Tensor, var: Var, scale: Tensor, shift: Tensor) -> Moments:
    """Eval-mode batch norm folded to an affine map per channel (axis 1)."""
    shape = (-1,) + (1,) * (mean.dim() - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    out_mean = mean * scale + shift
    return out_mean, None if var is None else _clamp(var * scale * scale)


def flatten(mean: Tensor, var: Var) -> Moments:
    return mean.flatten(1), None if var is None else var.flatten(1)


def add(mean: Tensor, var: Var, mean2: Tensor, var2: Var) -> Moments:
    """A residual sum. Variances add only if the summands are independent: the mean-field
    assumption, which a skip connection breaks (both sides see the same input), as every
    other op here already ignores correlations between units."""
    if var is None or var2 is None:
        return mean + mean2, var2 if var is None else var
    return mean + mean2, _clamp(var + var2)


OPS: dict[str, Callable[..., Moments]] = {
    "dense": dense,
    "conv2d": conv2d,
    "relu": relu,
    "maxpool2d": maxpool2d,
    "avgpool2d": avgpool2d,
    "batchnorm": batchnorm,
    "flatten": flatten,
    "add": add,
}
assert set(OPS) == set(MOMENT_OPS), "every MomentOp kind needs exactly one operator"
ARITY = {"add": 2}  # inputs per op; every other op takes one


def apply(op: MomentOp, mean: Tensor, var: Var, *more: Tensor | None) -> Moments:
    """Run one MomentOp; its tensors and attrs are the operator's keyword arguments.

    `more`: the (mean, var) of further inputs, flattened, for ops with several (add).
    """
    if op.op not in OPS:
        raise HarnessError(f"unknown moment op '{op.op}'; valid ops: {', '.join(MOMENT_OPS)}")
    return OPS[op.op](mean, var, *more, **op.tensors, **op.attrs)


def check_graph(ops: list[MomentOp]) -> None:
    """Every input an op names is an earlier op (or the program input), with the right count."""
    known = {MOMENT_INPUT}
    for i, op in enumerate(ops):
        if op.op not in OPS:
            raise HarnessError(f"unknown moment op '{op.op}'; valid ops: {', '.join(MOMENT_OPS)}")
        want = ARITY.get(op.op, 1)
        have = len(op.inputs) or 1
        if have != want:
            raise HarnessError(f"MomentOp {i} ('{op.op}') takes {want} inputs, got {have}")
        unknown = [n for n in op.inputs if n not in known]
        if unknown:
            raise HarnessError(
                f"MomentOp {i} ('{op.op}') reads {unknown}, which no earlier op is named"
            )
        if op.name:
            if op.name in known:
                raise HarnessError(f"MomentOp {i} reuses the name '{op.name}'")
            known.add(op.name)


def run_graph(
    ops: list[MomentOp], x: Tensor, step: Callable[[int, MomentOp, list[Moments]], Moments]
) -> Moments:
    """Runs `step(i, op, input moments)` over the program in order; returns the last output.

    The one place that resolves `MomentOp.inputs` in PyTorch, shared by PFP, linearisation
    and this module's `run`, so chains and graphs mean the same to all of them.
    """
    env: dict[str, Moments] = {MOMENT_INPUT: (x, None)}
    last = MOMENT_INPUT
    for i, op in enumerate(ops):
        args = [env[n] for n in op.inputs] if op.inputs else [env[last]]
        last = op.name or f"%{i}"
        env[last] = step(i, op, args)
    return env[last]


def run(ops: list[MomentOp], x: Tensor) -> tuple[Tensor, Tensor]:
    """The whole program on a deterministic input; the output variance is never None."""
    check_graph(ops)
    mean, var = run_graph(
        ops, x, lambda i, op, args: apply(op, *[t for pair in args for t in pair])
    )
    return mean, torch.zeros_like(mean) if var is None else var


def diagonal_moments(posterior: Posterior, net: nn.Module) -> tuple[dict, dict]:
    """(mu, var) per parameter name from `mu.<name>` / `sigma.<name>` (std) tensors."""
    names = [n for n, _ in net.named_parameters()]
    missing = [n for n in names if f"mu.{n}" not in posterior.tensors]
    missing += [n for n in names if f"sigma.{n}" not in posterior.tensors]
    if missing:
        raise HarnessError(
            f"posterior '{posterior.method}' is not a diagonal Gaussian over this network "
            f"(no mu./sigma. for {', '.join(sorted(set(missing)))})"
        )
    for n in names:
        require_finite(posterior.tensors[f"mu.{n}"], f"posterior mu.{n}")
        if not (posterior.tensors[f"sigma.{n}"] >= 0).all():
            raise HarnessError(f"posterior sigma.{n} has negative or NaN entries (a std is >= 0)")
    mu = {n: posterior.tensors[f"mu.{n}"].float() for n in names}
    # sigma above 1e15 would square to inf in float32; VAR_MAX is already "no information".
    var = {n: posterior.tensors[f"sigma.{n}"].float().square().clamp(max=VAR_MAX) for n in names}
    return mu, var


def _pair(value, what: str) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise HarnessError(f"PFP supports only square {what}, got {value}")
        value = value[0]
    if not isinstance(value, int):
        raise HarnessError(f"PFP supports only integer {what}, got {value!r}")
    return value


def _affine(
    path: str, layer: nn.Module, mu: dict, var: dict, quant: QuantSpec | None
) -> dict[str, Tensor]:
    mean_w, var_w = mu[f"{path}.weight"], var[f"{path}.weight"]
    if quant is not None and quant.weights:
        # Uniform on the standard deviation: the same grid a sampled weight mu + sigma*eps sees.
        mean_w = fake_quant(mean_w, quant.bits)
        var_w = fake_quant(var_w.sqrt(), quant.bits).square()
    if layer.bias is None:
        mean_b = var_b = mean_w.new_zeros(mean_w.shape[0])
    else:
        mean_b, var_b = mu[f"{path}.bias"], var[f"{path}.bias"]
    return {"mean_w": mean_w, "var_w": var_w, "mean_b": mean_b, "var_b": var_b}


def _conv_attrs(layer: nn.Conv2d) -> dict[str, int]:
    if _pair(layer.dilation, "conv dilation") != 1 or layer.groups != 1:
        raise HarnessError("PFP supports Conv2d with dilation 1 and groups 1 only")
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise HarnessError("PFP supports Conv2d with integer zero padding only")
    return {"stride": _pair(layer.stride, "conv stride"), "padding": _pair(layer.padding, "pad")}


def _pool_attrs(layer: nn.MaxPool2d | nn.AvgPool2d) -> dict[str, int]:
    if _pair(layer.padding, "pool padding") != 0 or layer.ceil_mode:
        raise HarnessError("PFP supports pooling without padding or ceil_mode only")
    if isinstance(layer, nn.MaxPool2d) and _pair(layer.dilation, "pool dilation") != 1:
        raise HarnessError("PFP supports max-pooling with dilation 1 only")
    kernel = _pair(layer.kernel_size, "pool kernel")
    stride = kernel if layer.stride is None else _pair(layer.stride, "pool stride")
    return {"kernel": kernel, "stride": stride}


def _batchnorm(path: str, layer: nn.modules.batchnorm._BatchNorm, mu: dict) -> dict[str, Tensor]:
    """Eval-mode batch norm as scale/shift; affine parameters enter at their posterior means.

    Running statistics are buffers, not posterior parameters: they come from `layer`
    (`load_buffers` puts a posterior's `buffer.` tensors there first).
    """
    if layer.running_mean is None or layer.running_var is None:
        raise HarnessError("PFP needs batch norm with running statistics (track_running_stats)")
    scale = (layer.running_var + layer.eps).rsqrt()
    shift = -layer.running_mean * scale
    if layer.affine:
        gamma, beta = mu[f"{path}.weight"], mu[f"{path}.bias"]
        scale, shift = scale * gamma, shift * gamma + beta
    return {"scale": scale.float(), "shift": shift.float()}


# From a network to a MomentOp program. torch.fx traces the network (nn.Sequential or any
# module whose forward fx can trace) with the supported layers kept as leaves; each graph
# node becomes one op, and a node whose input is not the previous op's output names its
# inputs, so a Sequential still gives a plain chain. Anything else is refused by name with
# the node that holds it, rather than silently propagated wrong.

SUPPORTED = (
    "Flatten, Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, BatchNorm1d/2d, Dropout, Identity, "
    "and the functions relu, add (residual, +), flatten, view/reshape(batch, -1), dropout"
)
_LEAVES = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_RELU = {F.relu, torch.relu, torch.relu_}
_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN = {torch.flatten}
_DROPOUT = {F.dropout}


class _Tracer(fx.Tracer):
    """Keeps the supported layers (and every other torch.nn layer) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


_traced: weakref.WeakKeyDictionary[nn.Module, fx.Graph] = weakref.WeakKeyDictionary()


def trace(net: nn.Module) -> fx.Graph:
    """The fx graph of `net` (cached per module object: PFP training rebuilds ops every step)."""
    graph = _traced.get(net)
    if graph is None:
        try:
            graph = _Tracer().trace(net)
        except Exception as err:  # fx raises TraceError, TypeError, ... on dynamic control flow
            raise HarnessError(
                f"cannot trace {type(net).__name__} with torch.fx ({type(err).__name__}: "
                f"{err}); moment propagation needs a forward without data-dependent Python"
            ) from err
        _traced[net] = graph
    return graph


@dataclass
class _Value:
    """What a graph node holds while building: the op that produced it and whether it is exact."""

    ref: str  # the producing op's name, or MOMENT_INPUT
    deterministic: bool
    batch: bool = False  # a batch-size scalar (x.size(0)), for view(B, -1)
    shape: bool = False  # x.shape, for x.shape[0]


def _callee(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__qualname__", None) or str(node.target)


def build_ops(
    net: nn.Module, mu: dict, var: dict, quant: QuantSpec | None = None
) -> list[MomentOp]:
    """The MomentOp program of `net` with weights N(mu, var); differentiable in mu and var.

    `first` marks a dense/conv layer whose input is deterministic (nothing before it has a
    posterior). Parameters are looked up by module path (`<path>.weight`), which for an
    nn.Sequential is the layer index, as in `named_parameters()`.
    """
    graph = trace(net)
    ops: list[MomentOp] = []
    env: dict[str, _Value] = {}
    affine = False

    def refuse(node: fx.Node, what: str) -> HarnessError:
        return HarnessError(
            f"PFP cannot propagate moments through {what} (graph node '{node.name}'); "
            f"supported layers: {SUPPORTED}"
        )

    def value(node: fx.Node, arg: object) -> _Value:
        if not isinstance(arg, fx.Node) or env[arg.name].batch or env[arg.name].shape:
            raise refuse(node, f"{_callee(node)} with a non-tensor argument {arg!r}")
        return env[arg.name]

    def emit(node: fx.Node, kind: str, args: list[_Value], tensors=None, attrs=None) -> _Value:
        last = ops[-1].name if ops else MOMENT_INPUT
        refs = tuple(a.ref for a in args)
        inputs = () if refs == (last,) else refs
        ops.append(MomentOp(kind, tensors or {}, attrs or {}, name=node.name, inputs=inputs))
        exact = kind not in ("dense", "conv2d") and all(a.deterministic for a in args)
        return _Value(node.name, exact)

    for node in graph.nodes:
        if node.op == "placeholder":
            if env:
                raise refuse(node, "a second network input")
            env[node.name] = _Value(MOMENT_INPUT, True)
            continue
        if node.op == "output":
            out = value(node, node.args[0])
            if not ops or out.ref != ops[-1].name:
                raise refuse(node, "an output that is not the last layer's")
            continue
        if node.op == "get_attr":
            raise refuse(node, f"the tensor attribute '{node.target}' used outside a layer")
        if node.op == "call_module":
            layer = net.get_submodule(node.target)
            args = [value(node, a) for a in node.args]
            if node.kwargs or len(args) != 1:
                raise refuse(node, f"layer {node.target} called with {len(args)} inputs")
            x, path = args[0], node.target
            if isinstance(layer, nn.Linear):
                attrs = {"first": x.deterministic}
                env[node.name] = emit(
                    node, "dense", args, _affine(path, layer, mu, var, quant), attrs
                )
                affine = True
            elif isinstance(layer, nn.Conv2d):
                attrs = {"first": x.deterministic, **_conv_attrs(layer)}
                tensors = _affine(path, layer, mu, var, quant)
                env[node.name] = emit(node, "conv2d", args, tensors, attrs)
                affine = True
            elif isinstance(layer, nn.ReLU):
                env[node.name] = emit(node, "relu", args)
            elif isinstance(layer, nn.MaxPool2d):
                env[node.name] = emit(node, "maxpool2d", args, attrs=_pool_attrs(layer))
            elif isinstance(layer, nn.AvgPool2d):
                if layer.divisor_override is not None:
                    raise HarnessError("PFP supports AvgPool2d without divisor_override only")
                env[node.name] = emit(node, "avgpool2d", args, attrs=_pool_attrs(layer))
            elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                env[node.name] = emit(node, "batchnorm", args, _batchnorm(path, layer, mu))
            elif isinstance(layer, nn.Flatten):
                if layer.start_dim != 1 or layer.end_dim != -1:
                    raise HarnessError("PFP supports Flatten from axis 1 to the end only")
                env[node.name] = emit(node, "flatten", args)
            elif isinstance(layer, (nn.Dropout, nn.Identity)):
                env[node.name] = x  # eval mode: the identity, as in the sampled SVI program
            else:
                raise refuse(node, f"layer {node.target} ({type(layer).__name__})")
            continue
        env[node.name] = _function(node, value, emit, refuse)
    if not affine:
        raise HarnessError("PFP needs at least one Linear or Conv2d layer with a posterior")
    return ops


def _function(node: fx.Node, value, emit, refuse) -> _Value:
    """A call_function / call_method node: relu, add, flatten, view/reshape, dropout, size."""
    fn, method = node.target, node.target if node.op == "call_method" else None
    args, kwargs = node.args, node.kwargs
    if fn in _RELU or method in ("relu", "relu_"):
        if set(kwargs) - {"inplace"}:
            raise refuse(node, f"{_callee(node)} with {sorted(kwargs)}")
        return emit(node, "relu", [value(node, args[0])])
    if fn in _ADD or method in ("add", "add_"):
        if kwargs.get("alpha", 1) != 1 or len(args) != 2 or set(kwargs) - {"alpha"}:
            raise refuse(node, f"{_callee(node)} other than a plain sum of two tensors")
        return emit(node, "add", [value(node, args[0]), value(node, args[1])])
    if fn in _DROPOUT or method == "dropout":
        return value(node, args[0])  # eval mode: the identity
    if method == "size" and args[1:] == (0,) and not kwargs:
        return _Value("", True, batch=True)
    if node.op == "call_function" and fn is getattr and args[1] == "shape":
        return _Value("", True, shape=True)
    if node.op == "call_function" and fn is operator.getitem and args[1] == 0:
        src = args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr:
            return _Value("", True, batch=True)
    if fn in _FLATTEN or method == "flatten":
        dims = [*args[1:], *kwargs.values()]
        if dims not in ([1], [1, -1]):
            raise refuse(node, f"{_callee(node)} other than flatten(x, 1)")
        return emit(node, "flatten", [value(node, args[0])])
    if method in ("view", "reshape") or fn is torch.reshape:
        shape = list(args[1:])
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        batch = len(shape) == 2 and isinstance(shape[0], fx.Node)
        if not (batch and _is_batch(shape[0]) and shape[1] == -1) or kwargs:
            raise refuse(node, f"{_callee(node)} other than a flatten to (batch, -1)")
        return emit(node, "flatten", [value(node, args[0])])
    raise refuse(node, _callee(node))


def _is_batch(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target == "size":
        return node.args[1:] == (0,)
    return node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0


def load_buffers(posterior: Posterior, net: nn.Module) -> nn.Module:
    """Copies the posterior's `buffer.<name>` tensors (batch-norm running statistics) into `net`.

    Buffers are not random, so they are stored once, beside `mu.`/`sigma.`; a posterior
    without them leaves the freshly built net's (running mean 0, variance 1).
    """
    buffers = dict(net.named_buffers())
    for key, tensor in posterior.tensors.items():
        if key.startswith("buffer."):
            name = key[len("buffer.") :]
            if name not in buffers:
                raise HarnessError(f"posterior tensor '{key}': the network has no buffer '{name}'")
            if buffers[name].shape != tensor.shape:
                raise HarnessError(
                    f"posterior tensor '{key}' has shape {tuple(tensor.shape)}, the network's "
                    f"buffer {tuple(buffers[name].shape)}"
                )
            buffers[name].copy_(tensor)
    return net
