"""Any InferenceProgram on TVM: torch.export, the Relax frontend, then the same build as PFP.

Random draws are the catch. TVM's PyTorch frontend turns `randn`/`randn_like` into
constants frozen at import time and drops dropout, so a sampling program would run with
the same "random" numbers on every call (MC dropout: with no dropout at all). Here every
draw of the program (torch.randn, randn_like, rand, rand_like, and dropout's mask)
becomes an input of the exported graph instead: a recording pass learns their shapes,
and each call of the executable samples fresh standard normals or uniforms with
PyTorch's generator and feeds them in. That sampling runs inside the executable's call,
so its cost is in every timing; everything downstream of the noise (reparameterisation,
local reparameterisation, masks, the S forward passes) is compiled by TVM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from harness.api import HarnessError, InferenceProgram

NORMAL = (torch.randn, torch.randn_like)
UNIFORM = (torch.rand, torch.rand_like)


@dataclass(frozen=True)
class Draw:
    shape: tuple[int, ...]
    law: str  # "normal" or "uniform"

    def sample(self) -> Tensor:
        return torch.randn(self.shape) if self.law == "normal" else torch.rand(self.shape)


def _shape(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...]:
    if func in (torch.randn_like, torch.rand_like):
        return tuple(args[0].shape)
    size = kwargs.get("size", args)
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    return tuple(int(s) for s in size)


class NoiseAsInputs(TorchFunctionMode):
    """Records the program's random draws (feed None) or serves them from `feed`."""

    def __init__(self, feed: list[Tensor] | None = None):
        super().__init__()
        self.feed, self.draws = feed, []

    def _next(self, shape: tuple[int, ...], law: str, like: Tensor | None = None) -> Tensor:
        draw = Draw(shape, law)
        self.draws.append(draw)
        if self.feed is None:
            return draw.sample()
        i = len(self.draws) - 1
        if i >= len(self.feed) or tuple(self.feed[i].shape) != shape:
            raise HarnessError("the program's random draws changed between tracing and export")
        return self.feed[i]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in NORMAL or func in UNIFORM:
            if kwargs.get("generator") is not None:
                raise HarnessError("programs with their own torch.Generator cannot run on TVM")
            law = "normal" if func in NORMAL else "uniform"
            return self._next(_shape(func, args, kwargs), law)
        if func is F.dropout:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if not training or p == 0:
                return x
            keep = self._next(tuple(x.shape), "uniform") >= p
            return x * keep.to(x.dtype) / (1.0 - p)
        return func(*args, **kwargs)


class _WithNoise(nn.Module):
    def __init__(self, program: InferenceProgram):
        super().__init__()
        self.program = program

    def forward(self, x: Tensor, *noise: Tensor) -> Any:
        with NoiseAsInputs(list(noise)):
            return self.program(x)


def trace_draws(program: InferenceProgram, x: Tensor) -> list[Draw]:
    with torch.no_grad(), NoiseAsInputs() as mode:
        program(x)
    return mode.draws


def to_relax(program: InferenceProgram, x: Tensor) -> tuple[Any, list[Draw]]:
    """The Relax module of `program` at x's (static) shape, and the draws it takes as inputs."""
    from tvm.relax.frontend.torch import from_exported_program

    draws = trace_draws(program, x)
    noise = tuple(d.sample() for d in draws)
    try:
        with torch.no_grad():
            exported = torch.export.export(_WithNoise(program), (x, *noise))
        mod = from_exported_program(exported, unwrap_unit_return_tuple=True)
    except HarnessError:
        raise
    except Exception as err:  # the frontend's own errors name the unsupported operator
        raise HarnessError(
            f"TVM's PyTorch frontend cannot import this program: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return mod, draws
