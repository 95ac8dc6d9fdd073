"""A 1-D regression task that ships with the code, for the weight-shape width sweep.

y = sin(2x) + 0.3 x + noise (std ``noise_std``), x uniform on [-2, 2] for train, val and
test; the OOD split is x on [3, 5], where a BNN's predictive should widen. Targets are
float tensors of shape [N, 1]; the spec reports one output (``num_classes=1``). The
harness metrics are classification-only, so this dataset serves the weight-shape
benchmark (benchmarks/weight_shape.py), not `bnn-harness` runs. Everything is a
deterministic function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.api import DataBundle, DataSpec

from ._common import cfg_float, cfg_int, rngs

DOMAIN = (-2.0, 2.0)
OOD_DOMAIN = (3.0, 5.0)


@dataclass
class Regression1DConfig:
    name: str = "regression1d"
    n_train: int = 256
    n_test: int = 256
    noise_std: float = 0.1


def target(x: np.ndarray) -> np.ndarray:
    return np.sin(2 * x) + 0.3 * x


def _split(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    as_col = lambda a: torch.from_numpy(a.astype(np.float32)[:, None])  # noqa: E731
    return as_col(x), as_col(y)


class Regression1D:
    name = "regression1d"

    def load(self, cfg: Any, seed: int) -> DataBundle:
        n_train = cfg_int(cfg, "n_train", 256, lo=2)
        n_test = cfg_int(cfg, "n_test", 256, lo=1)
        noise = cfg_float(cfg, "noise_std", 0.1)
        r_train, r_val, r_test, r_ood = rngs(seed, 4)

        def draw(rng: np.random.Generator, n: int, lo: float, hi: float) -> tuple[Tensor, Tensor]:
            x = rng.uniform(lo, hi, n)
            return _split(x, target(x) + noise * rng.standard_normal(n))

        return DataBundle(
            train=draw(r_train, n_train, *DOMAIN),
            val=draw(r_val, max(n_train // 4, 1), *DOMAIN),
            test=draw(r_test, n_test, *DOMAIN),
            spec=DataSpec(input_shape=(1,), num_classes=1),
            ood={"far": draw(r_ood, n_test, *OOD_DOMAIN)},
        )
