"""Helpers shared by the dataset plugins: config access, noise, tensor packing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.api import HarnessError, Split, require_finite

MISSING = "???"


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key`, or `default` when the field is absent or None.

    Works for omegaconf DictConfigs (struct or not), dataclasses and plain namespaces. A
    mandatory value left unset (omegaconf's "???") is reported as a HarnessError.
    """
    if cfg is None:
        return default
    try:
        value = getattr(cfg, key)
    except AttributeError:
        return default
    except Exception as exc:  # omegaconf.MissingMandatoryValue, without importing omegaconf
        if type(exc).__name__ == "MissingMandatoryValue":
            raise HarnessError(f"dataset config field '{key}' must be set") from None
        raise
    if value is None:
        return default
    if isinstance(value, str) and value == MISSING:
        raise HarnessError(f"dataset config field '{key}' must be set")
    return value


def cfg_float(cfg: Any, key: str, default: float, *, lo: float = 0.0) -> float:
    value = cfg_get(cfg, key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise HarnessError(
            f"dataset config field '{key}' must be a number, got {value!r}"
        ) from None
    if not np.isfinite(value) or value < lo:
        raise HarnessError(f"dataset config field '{key}' must be a finite number >= {lo}")
    return value


def cfg_int(cfg: Any, key: str, default: int | None, *, lo: int = 0) -> int | None:
    value = cfg_get(cfg, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HarnessError(f"dataset config field '{key}' must be an integer, got {value!r}")
    if value < lo:
        raise HarnessError(f"dataset config field '{key}' must be >= {lo}, got {value}")
    return int(value)


def rngs(seed: int, n: int) -> list[np.random.Generator]:
    """`n` independent generators derived from `seed`, one per concern.

    Separate streams keep, e.g., the split permutation unchanged when only the OOD size or
    the ambiguous fraction changes.
    """
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def add_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Dirty-MNIST's fixed additive Gaussian noise (drawn once, in normalised units)."""
    if std <= 0 or x.size == 0:
        return x
    return x + std * rng.standard_normal(x.shape, dtype=np.float32)


def to_split(x: np.ndarray, y: np.ndarray, what: str) -> Split:
    """Numpy arrays -> (float32, int64) tensors, checked non-empty and finite."""
    if len(x) == 0:
        raise HarnessError(f"{what} split is empty")
    if len(x) != len(y):
        raise HarnessError(f"{what} split has {len(x)} inputs but {len(y)} labels")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    require_finite(xt, f"{what} split")
    return xt, yt


# Where `make data` (python -m plugins.datasets.fetch) puts the packaged data sets, and where
# the packaged Dirty-MNIST looks for them: $BNN_HARNESS_DATA, else data/ under the cwd, so an
# installed wheel run from anywhere finds a checkout's data through the variable.
DATA_ENV = "BNN_HARNESS_DATA"
MNIST_PACKAGED_DIR = "mnist-packaged"
FASHION_DIR = "fashion-mnist"
DIGITS_IMAGES = "digits-images-idx3-ubyte"
DIGITS_LABELS = "digits-labels-idx1-ubyte"
STAMP = "packaged.sha256"


def data_root(root: str | None = None) -> Path:
    """`root` if given, else $BNN_HARNESS_DATA, else ./data."""
    return Path(root or os.environ.get(DATA_ENV) or "data").expanduser()
