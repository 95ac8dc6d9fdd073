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


def schedule_func(func: Any, lanes: int) -> Any | None:
    """A fused PrimFunc built around one matmul/conv (`FuseOps` output: injective
    producers, the reduction, elementwise epilogues) with the Gaussian library's dense
    schedule: register tile of whole vectors on the output's last axis, a block of rows
    sharing each weight load, the epilogue (bias, ReLU, broadcast) applied in the tile
    before the write-back. None when the function is not of that shape: DLight gets it.

    DLight's CPU rules (GEMV, Reduction) give a matmul one dot product per output, no
    register tiling: about 1.4 GFLOP/s, slower than eager PyTorch at every batch size."""
    from tvm import s_tir

    from plugins.backends.tvm import schedules

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [
        i for i, b in enumerate(blocks) if any(it.iter_type != 0 for it in sch.get(b).iter_vars)
    ]
    if len(reductions) != 1:
        return None
    at = reductions[0]
    spatial = [it for it in sch.get(blocks[at]).iter_vars if it.iter_type == 0]
    if len(spatial) < 2 or len(sch.get(blocks[at]).writes) != 1:
        return None
    try:
        # Producers (pads, broadcasts, weight arithmetic) stay loops of their own: a pad
        # inlined into a conv puts a bounds test in its inner loop, which stops the
        # vectoriser (LeNet's first conv: 10 ms instead of 0.5 at batch 100).
        # A producer of the epilogue only (SWAG's sqrt(var) * z beside its low-rank matmul)
        # is inlined into it: the write-back it joins may read one producer only.
        feeds = {str(r.source) for r in sch.get(blocks[at]).reads}
        for producer in blocks[:at]:
            if {str(w.source) for w in sch.get(producer).writes} & feeds:
                schedules._elementwise(sch, producer, lanes)
            else:
                sch.compute_inline(producer)
        schedules._reduction(sch, blocks[at], lanes, list(blocks[at + 1 :]), all_rows=True)
    except (RuntimeError, ValueError):  # s_tir.ScheduleError is a RuntimeError
        return None
    return sch.mod["main"]


def schedule_fused(mod: Any, lanes: int) -> Any:
    """schedule_func on every PrimFunc of a fused module; the others are left unscheduled."""
    import tvm
    from tvm import tirx

    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            done = schedule_func(func, lanes)
            if done is not None:
                func = done.with_attrs({"global_symbol": gv.name_hint, "tirx.is_scheduled": True})
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs)
