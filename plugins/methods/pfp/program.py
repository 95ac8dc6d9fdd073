"""PFPProgram: a MomentOp program (a chain, or a graph with residual adds) run by the
PyTorch operators of harness/moments.py.

The list is the program: moment_ops() hands the very same ops to a backend with its own
Gaussian operators (TVM), so both execute one graph and must agree to float32 tolerance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from harness.api import MOMENT_OPS, HarnessError, InferenceProgram, MomentOp, fake_quant
from harness.api import moments as gops


class PFPProgram(InferenceProgram):
    """Gaussian logits (mean [B, C], var [B, C]) from one deterministic-cost pass.

    `act_bits` fake-quantizes the propagated means after every ReLU (joint quantization);
    that is not expressible as MomentOps, so such a program reports no moment_ops().
    """

    kind = "moments"

    def __init__(self, ops: list[MomentOp], act_bits: int | None = None):
        super().__init__()
        for op in ops:
            if op.op not in gops.OPS:
                valid = ", ".join(MOMENT_OPS)
                raise HarnessError(f"unknown moment op '{op.op}'; valid ops: {valid}")
        gops.check_graph(ops)
        self.ops = ops
        self.act_bits = act_bits
        # Buffers so .to(device) and state_dict() see the tensors; ops share their storage.
        for i, op in enumerate(ops):
            for name, tensor in op.tensors.items():
                self.register_buffer(f"op{i}_{name}", tensor, persistent=False)

    def moment_ops(self) -> list[MomentOp] | None:
        return None if self.act_bits else self.ops

    def _step(self, i: int, op: MomentOp, args: list[gops.Moments]) -> gops.Moments:
        tensors = {k: getattr(self, f"op{i}_{k}") for k in op.tensors}
        mean, var = gops.OPS[op.op](*[t for pair in args for t in pair], **tensors, **op.attrs)
        if self.act_bits and op.op == "relu":
            mean = fake_quant(mean, self.act_bits, dim=0)
        return mean, var

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = gops.run_graph(self.ops, x, self._step)
        return mean, torch.zeros_like(mean) if var is None else var
