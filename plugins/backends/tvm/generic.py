"""Any InferenceProgram on TVM: torch.export, the Relax frontend, then the same build as PFP.

Random draws are the catch. TVM's PyTorch frontend turns `randn`/`randn_like` into
constants frozen at import time and drops dropout, so a sampling program would run with
the same "random" numbers on every call (MC dropout: with no dropout at all). So the
program's declared draws (`InferenceProgram.draws`: weight noise, dropout keep masks)
become inputs of the exported graph through the API's shared helper (`with_draws`), and
each call of the executable samples them fresh with PyTorch (`sample_draws`) and feeds
them in. That sampling runs inside the executable's call, so its cost is in every
timing; everything downstream of the noise (reparameterisation, local
reparameterisation, masks, the S forward passes) is compiled by TVM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from harness.api import Draw, HarnessError, InferenceProgram, sample_draws, with_draws


def to_relax(program: InferenceProgram, x: Tensor) -> tuple[Any, list[Draw]]:
    """The Relax module of `program` at x's (static) shape, and the draws it takes as inputs."""
    from tvm.relax.frontend.torch import from_exported_program

    module, draws = with_draws(program, x)
    noise = tuple(sample_draws(draws))
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (x, *noise))
        mod = from_exported_program(exported, unwrap_unit_return_tuple=True)
    except HarnessError:
        raise
    except Exception as err:  # the frontend's own errors name the unsupported operator
        raise HarnessError(
            f"TVM's PyTorch frontend cannot import this program: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return mod, draws
