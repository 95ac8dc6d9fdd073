"""Two moons: a 2-D problem small enough to train in a second, with all four splits.

In-distribution: scikit-learn's `make_moons` with Gaussian noise `noise`. Ambiguous: the
same moons with `ambiguous_noise`, so the classes overlap (aleatoric uncertainty).
OOD: points on a ring of radius 4-6 around the data, far from both moons (epistemic).
Everything is standardised with the training mean and std, and is a function of `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import make_moons

from harness.api import DataBundle, DataSpec, HarnessError


@dataclass
class TwoMoonsConfig:
    name: str = "two_moons"
    n_train: int = 1000
    n_test: int = 500
    noise: float = 0.15
    ambiguous_noise: float = 0.6


class TwoMoons:
    name = "two_moons"

    def load(self, cfg: TwoMoonsConfig, seed: int) -> DataBundle:
        if cfg.n_train < 2 or cfg.n_test < 2:
            raise HarnessError("dataset.n_train and dataset.n_test must be at least 2")
        if cfg.noise < 0 or cfg.ambiguous_noise < 0:
            raise HarnessError("dataset.noise and dataset.ambiguous_noise must be >= 0")
        rng = np.random.default_rng(seed)

        def moons(n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
            return make_moons(n, noise=noise, random_state=int(rng.integers(2**31)))

        train, val, test = (moons(n, cfg.noise) for n in (cfg.n_train, cfg.n_test, cfg.n_test))
        ambiguous = moons(cfg.n_test, cfg.ambiguous_noise)
        angle = rng.uniform(0, 2 * np.pi, cfg.n_test)
        radius = rng.uniform(4, 6, cfg.n_test)
        ring = np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None] + [0.5, 0.25]
        mean, std = train[0].mean(0), train[0].std(0)

        def split(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            z = torch.as_tensor((x - mean) / std, dtype=torch.float32)
            return z, torch.as_tensor(y, dtype=torch.long)

        return DataBundle(
            train=split(*train),
            val=split(*val),
            test=split(*test),
            spec=DataSpec((2,), 2),
            ambiguous=split(*ambiguous),
            ood={"ring": split(ring, -np.ones(cfg.n_test, dtype=np.int64))},
        )
