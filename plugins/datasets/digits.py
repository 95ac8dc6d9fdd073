"""Dirty-Digits: the Dirty-MNIST protocol on an embedded 8x8 digits set (no network).

Data sources (all ship inside scikit-learn, so this dataset loads offline):

* In-distribution: ``sklearn.datasets.load_digits()``, the UCI "Optical Recognition of
  Handwritten Digits" test set: 1797 grayscale 8x8 images, values 0..16, 10 classes. Pixel
  values are scaled to [0, 1] and shaped [N, 1, 8, 8].
* OOD "patches": ``sklearn.datasets.load_sample_images()`` (china.jpg, flower.jpg, the two
  photographs bundled with scikit-learn). Random square crops of side 8k (k drawn from 2..8)
  are converted to grayscale, block-averaged down to 8x8 and min-max rescaled to [0, 1].
* OOD "noise": i.i.d. uniform [0, 1] pixels.

Protocol, after Mukhoti et al., "Deep Deterministic Uncertainty" (Dirty-MNIST = MNIST +
AmbiguousMNIST, with fixed additive Gaussian noise):

1. Shuffle the 1797 images (seeded) and cut train / val / test at 60 / 15 / 25 %.
2. Ambiguous images are blends ``a * x_i + (1 - a) * x_j`` of two images of *different*
   classes with ``a ~ U[0.4, 0.6]``; the label is class(i) with probability ``a``, else
   class(j). Blends built from train images (``ambiguous_fraction * len(train)`` of them) are
   appended to ``train``; a held-out set of ``len(test)`` blends built only from test images
   is the ``ambiguous`` split. Val and test stay clean.
3. Normalise everything with the scalar pixel mean / std of the *clean* train images (kept on
   the instance as ``self.stats`` after ``load``).
4. Add Gaussian noise of std ``noise_std`` (normalised units) once, to train, val, test and
   ambiguous, as Dirty-MNIST does; the OOD sets are normalised but not noised (as DDU's
   Fashion-MNIST OOD set).

OOD labels are -1. Everything is a deterministic function of ``seed`` (numpy Generators
derived from ``SeedSequence(seed)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from harness.api import DataBundle, DataSpec, HarnessError

from ._common import add_noise, cfg_float, cfg_int, rngs, to_split

TRAIN_FRACTION = 0.60
VAL_FRACTION = 0.15
ALPHA_RANGE = (0.4, 0.6)
SIDE = 8


@dataclass
class DirtyDigitsConfig:
    name: str = "dirty_digits"
    ambiguous_fraction: float = 0.5
    noise_std: float = 0.05
    ood_size: int = 400


def clean_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ([N, 1, 8, 8] float32 in [0, 1], [N] int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, digits.target.astype(np.int64)


def make_blends(
    x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`n` blends of two images of different classes, and their labels.

    Returns (images, labels, provenance) where provenance holds the indices `i`, `j` and
    weights `alpha` with ``images = alpha * x[i] + (1 - alpha) * x[j]``.
    """
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        prov = {"i": empty, "j": empty, "alpha": np.zeros(0, np.float32)}
        return np.zeros((0, *x.shape[1:]), np.float32), empty, prov
    if len(np.unique(y)) < 2:
        raise HarnessError("cannot build ambiguous blends: need images of at least two classes")
    i = rng.integers(len(x), size=n)
    j = rng.integers(len(x), size=n)
    same = y[i] == y[j]
    while same.any():
        j[same] = rng.integers(len(x), size=int(same.sum()))
        same = y[i] == y[j]
    alpha = rng.uniform(*ALPHA_RANGE, size=n).astype(np.float32)
    a = alpha[:, None, None, None]
    images = a * x[i] + (1.0 - a) * x[j]
    labels = np.where(rng.random(n) < alpha, y[i], y[j]).astype(np.int64)
    return images.astype(np.float32), labels, {"i": i, "j": j, "alpha": alpha}


@lru_cache(maxsize=1)
def _grayscale_photos() -> tuple[np.ndarray, ...]:
    """The bundled photographs (china.jpg, flower.jpg) as grayscale in [0, 1], cached."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return tuple((img.astype(np.float32) / 255.0) @ luma for img in photos)


def photo_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` 8x8 patches block-averaged from random crops of the bundled photographs."""
    photos = _grayscale_photos()
    out = np.empty((n, 1, SIDE, SIDE), dtype=np.float32)
    for t in range(n):
        img = photos[rng.integers(len(photos))]
        k = int(rng.integers(2, 9))
        size = SIDE * k
        r = int(rng.integers(img.shape[0] - size + 1))
        c = int(rng.integers(img.shape[1] - size + 1))
        patch = img[r : r + size, c : c + size].reshape(SIDE, k, SIDE, k).mean(axis=(1, 3))
        lo, hi = patch.min(), patch.max()
        out[t, 0] = (patch - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(patch)
    return out


class DirtyDigits:
    """Dirty-MNIST-style benchmark on scikit-learn's 8x8 digits; see the module docstring."""

    name = "dirty_digits"

    def __init__(self) -> None:
        self.stats: dict[str, float] | None = None

    def load(self, cfg: Any, seed: int) -> DataBundle:
        fraction = cfg_float(cfg, "ambiguous_fraction", 0.5)
        noise_std = cfg_float(cfg, "noise_std", 0.05)
        ood_size = cfg_int(cfg, "ood_size", 400, lo=1)
        r_split, r_amb_train, r_amb_test, r_noise, r_patch, r_uniform = rngs(seed, 6)

        x, y = clean_digits()
        perm = r_split.permutation(len(x))
        x, y = x[perm], y[perm]
        n_train = int(TRAIN_FRACTION * len(x))
        n_val = int(VAL_FRACTION * len(x))
        xtr, ytr = x[:n_train], y[:n_train]
        xva, yva = x[n_train : n_train + n_val], y[n_train : n_train + n_val]
        xte, yte = x[n_train + n_val :], y[n_train + n_val :]

        xa_tr, ya_tr, _ = make_blends(xtr, ytr, round(fraction * n_train), r_amb_train)
        xa_te, ya_te, _ = make_blends(xte, yte, len(xte), r_amb_test)

        mean, std = float(xtr.mean()), float(xtr.std())
        self.stats = {"mean": mean, "std": std}

        def norm(a: np.ndarray) -> np.ndarray:
            return (a - mean) / std

        def dirty(a: np.ndarray) -> np.ndarray:
            return add_noise(norm(a), noise_std, r_noise)

        train_x = np.concatenate([xtr, xa_tr])
        train_y = np.concatenate([ytr, ya_tr])
        uniform = r_uniform.random((ood_size, 1, SIDE, SIDE), dtype=np.float32)
        ood_y = np.full(ood_size, -1, dtype=np.int64)
        return DataBundle(
            train=to_split(dirty(train_x), train_y, "dirty_digits train"),
            val=to_split(dirty(xva), yva, "dirty_digits val"),
            test=to_split(dirty(xte), yte, "dirty_digits test"),
            spec=DataSpec(input_shape=(1, SIDE, SIDE), num_classes=10),
            ambiguous=to_split(dirty(xa_te), ya_te, "dirty_digits ambiguous"),
            ood={
                "patches": to_split(norm(photo_patches(ood_size, r_patch)), ood_y, "patches"),
                "noise": to_split(norm(uniform), ood_y.copy(), "noise"),
            },
        )
