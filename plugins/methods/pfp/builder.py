"""From an nn.Sequential and a diagonal Gaussian posterior to a MomentOp list.

The walk is by layer type, in order, so any Sequential of the supported layers works (the
model plugins' MLP and LeNet-5 included); anything else is refused by name rather than
silently propagated wrong.
"""

from __future__ import annotations

from torch import Tensor, nn

from harness.api import HarnessError, MomentOp, Posterior, QuantSpec, fake_quant, require_finite
from plugins.methods.pfp.ops import VAR_MAX

SUPPORTED = "Flatten, Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, BatchNorm1d/2d, Dropout, Identity"


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
    idx: int, layer: nn.Module, mu: dict, var: dict, quant: QuantSpec | None
) -> dict[str, Tensor]:
    mean_w, var_w = mu[f"{idx}.weight"], var[f"{idx}.weight"]
    if quant is not None and quant.weights:
        # Uniform on the standard deviation: the same grid a sampled weight mu + sigma*eps sees.
        mean_w = fake_quant(mean_w, quant.bits)
        var_w = fake_quant(var_w.sqrt(), quant.bits).square()
    if layer.bias is None:
        mean_b = var_b = mean_w.new_zeros(mean_w.shape[0])
    else:
        mean_b, var_b = mu[f"{idx}.bias"], var[f"{idx}.bias"]
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


def _batchnorm(idx: int, layer: nn.modules.batchnorm._BatchNorm, mu: dict) -> dict[str, Tensor]:
    """Eval-mode batch norm as scale/shift; affine parameters enter at their posterior means.

    Running statistics are buffers, not posterior parameters: they come from `layer`.
    """
    if layer.running_mean is None or layer.running_var is None:
        raise HarnessError("PFP needs batch norm with running statistics (track_running_stats)")
    scale = (layer.running_var + layer.eps).rsqrt()
    shift = -layer.running_mean * scale
    if layer.affine:
        gamma, beta = mu[f"{idx}.weight"], mu[f"{idx}.bias"]
        scale, shift = scale * gamma, shift * gamma + beta
    return {"scale": scale.float(), "shift": shift.float()}


def build_ops(
    net: nn.Sequential, mu: dict, var: dict, quant: QuantSpec | None = None
) -> list[MomentOp]:
    """The MomentOp program of `net` with weights N(mu, var); differentiable in mu and var.

    `first` marks the first dense/conv layer: everything before it is deterministic.
    """
    if not isinstance(net, nn.Sequential):
        raise HarnessError(f"PFP needs an nn.Sequential network, got {type(net).__name__}")
    ops: list[MomentOp] = []
    first = True
    for idx, layer in enumerate(net):
        if isinstance(layer, nn.Linear):
            ops.append(MomentOp("dense", _affine(idx, layer, mu, var, quant), {"first": first}))
            first = False
        elif isinstance(layer, nn.Conv2d):
            attrs = {"first": first, **_conv_attrs(layer)}
            ops.append(MomentOp("conv2d", _affine(idx, layer, mu, var, quant), attrs))
            first = False
        elif isinstance(layer, nn.ReLU):
            ops.append(MomentOp("relu"))
        elif isinstance(layer, nn.MaxPool2d):
            ops.append(MomentOp("maxpool2d", attrs=_pool_attrs(layer)))
        elif isinstance(layer, nn.AvgPool2d):
            if layer.divisor_override is not None:
                raise HarnessError("PFP supports AvgPool2d without divisor_override only")
            ops.append(MomentOp("avgpool2d", attrs=_pool_attrs(layer)))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            ops.append(MomentOp("batchnorm", _batchnorm(idx, layer, mu)))
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise HarnessError("PFP supports Flatten from axis 1 to the end only")
            ops.append(MomentOp("flatten"))
        elif isinstance(layer, (nn.Dropout, nn.Identity)):
            continue  # eval mode: the identity, as in the sampled SVI program
        else:
            raise HarnessError(
                f"PFP cannot propagate moments through layer {idx} ({type(layer).__name__}); "
                f"supported layers: {SUPPORTED}"
            )
    if first:
        raise HarnessError("PFP needs at least one Linear or Conv2d layer with a posterior")
    return ops
