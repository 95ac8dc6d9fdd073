"""MNIST, Fashion-MNIST and Dirty-MNIST from files the user already has (no download).

Expected files (each may also be gzipped, with a ``.gz`` suffix):

* ``cfg.root`` for ``mnist`` / ``dirty_mnist`` (MNIST, http://yann.lecun.com/exdb/mnist/) and
  for ``fashion_mnist`` (Fashion-MNIST, https://github.com/zalandoresearch/fashion-mnist):
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``.
* ``cfg.ood_root`` (optional): the same four file names for the OOD set, Fashion-MNIST for
  ``mnist`` / ``dirty_mnist`` (OOD set "fashion_mnist") and MNIST for ``fashion_mnist`` (OOD
  set "mnist"). Only its test files are used.
* ``cfg.ambiguous_root`` (``dirty_mnist`` only): ``ambiguous_mnist.npz`` with arrays
  ``x_train``, ``y_train``, ``x_test``, ``y_test``. Images are [N, 28, 28] or [N, 1, 28, 28],
  either uint8 in 0..255 or floats in [0, 1]; labels are integers in 0..9. This is
  AmbiguousMNIST (Mukhoti et al., "Deep Deterministic Uncertainty"); the ddu-dirty-mnist
  package ships it as ``amnist_samples.pt`` / ``amnist_labels.pt``, which convert to this
  NPZ with ``torch.load`` + ``numpy.savez``.

``dirty_mnist`` reads these files with ``source=files``; by default (``source=packaged``) it
builds Dirty-MNIST from `make data`'s packaged digits instead (plugins/datasets/packaged.py).

Splits: val is the last ``min(val_size, len(train) // 10)`` images of the official train set;
test is the official t10k set; ``limit`` caps the training set to a seeded random subset.
Images become [N, 1, 28, 28] float32, scaled to [0, 1] and normalised with the in-distribution
dataset's mean / std (MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530); OOD sets use the
in-distribution statistics, and carry label -1.

Dirty-MNIST trains on MNIST + AmbiguousMNIST train, tests on MNIST test, uses AmbiguousMNIST
test as the ``ambiguous`` split, and adds fixed Gaussian noise (std ``noise_std``, 0.05 by
default, in normalised units) to train / val / test / ambiguous as the original does. The
OOD set is not noised.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import DataBundle, DataSpec, HarnessError, Split

from ._common import add_noise, cfg_float, cfg_get, cfg_int, rngs, to_split

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
AMBIGUOUS_FILE = "ambiguous_mnist.npz"
MAGIC_LABELS = 0x00000801
MAGIC_IMAGES = 0x00000803
MNIST_STATS = (0.1307, 0.3081)
FASHION_STATS = (0.2860, 0.3530)
SPEC = DataSpec(input_shape=(1, 28, 28), num_classes=10)


@dataclass
class IdxConfig:
    name: str = "mnist"
    root: str = "???"
    ood_root: str | None = None
    ambiguous_root: str | None = None
    val_size: int = 5000
    limit: int | None = None


@dataclass
class MNISTConfig(IdxConfig):
    name: str = "mnist"


@dataclass
class FashionMNISTConfig(IdxConfig):
    name: str = "fashion_mnist"


@dataclass
class DirtyMNISTConfig(IdxConfig):
    """``source=packaged`` (default): `make data`'s files, see plugins/datasets/packaged.py;
    ``source=files``: the user's own MNIST / AmbiguousMNIST / Fashion-MNIST, as above.

    ``root``: packaged: the data directory (default $BNN_HARNESS_DATA or ./data); files: the
    MNIST directory (required). ``val_size``: default 1000 (packaged) or 5000 (files).
    ``limit`` caps the training digits (packaged: before the ambiguous ones are added);
    ``eval_limit`` (packaged) caps val, test, ambiguous and each OOD set. The other sizes and
    ``data_seed`` apply to the packaged source only.
    """

    name: str = "dirty_mnist"
    source: str = "packaged"
    root: str | None = None
    val_size: int | None = None
    noise_std: float = 0.05
    train_size: int = 7000
    test_size: int = 2000
    ambiguous_fraction: float = 1.0
    ambiguous_test: int = 2000
    ood_size: int = 2000
    data_seed: int = 0
    eval_limit: int | None = None


SOURCES = ("packaged", "files")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (``.gz`` accepted) as a uint8 array of its shape."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise HarnessError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise HarnessError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4:
        raise HarnessError(f"{path} is not an IDX file: only {len(raw)} bytes")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in (MAGIC_LABELS, MAGIC_IMAGES):
        raise HarnessError(
            f"{path} has bad IDX magic 0x{magic:08x}; expected 0x00000801 (ubyte labels) "
            "or 0x00000803 (ubyte images)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HarnessError(f"{path} is truncated: IDX header needs {header} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise HarnessError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} needs {size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _expected(names: list[str]) -> str:
    return ", ".join(names) + " (each optionally .gz)"


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_set(root: str | Path, what: str, *, train: bool = True) -> dict[str, np.ndarray]:
    """The four (or, with train=False, the two test) standard IDX files under `root`."""
    root = Path(root).expanduser()
    keys = list(IDX_FILES) if train else ["test_images", "test_labels"]
    names = [IDX_FILES[k] for k in keys]
    if not root.is_dir():
        raise HarnessError(
            f"{what} directory {root} does not exist; expected files: {_expected(names)}"
        )
    paths = {k: _find(root, IDX_FILES[k]) for k in keys}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise HarnessError(
            f"{what} directory {root} lacks {', '.join(missing)}; "
            f"expected files: {_expected(names)}"
        )
    out = {k: read_idx(p) for k, p in paths.items()}
    for part in ("train", "test") if train else ("test",):
        images, labels = out[f"{part}_images"], out[f"{part}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise HarnessError(f"{what} {part} images have shape {images.shape}, not [N, 28, 28]")
        if labels.ndim != 1:
            raise HarnessError(f"{what} {part} labels have shape {labels.shape}, not [N]")
        if len(images) != len(labels):
            raise HarnessError(f"{what} {part} has {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise HarnessError(f"{what} {part} split is empty")
        if labels.max() > 9:
            raise HarnessError(f"{what} {part} labels exceed 9 (max {labels.max()})")
    return out


def read_ambiguous(root: str | Path) -> dict[str, np.ndarray]:
    """AmbiguousMNIST from `root`/ambiguous_mnist.npz, images as [N, 1, 28, 28] in [0, 1]."""
    root = Path(root).expanduser()
    path = root / AMBIGUOUS_FILE
    if not path.is_file():
        state = "lacks" if root.is_dir() else "does not exist; expected"
        raise HarnessError(
            f"AmbiguousMNIST directory {root} {state} {AMBIGUOUS_FILE} "
            "(arrays x_train, y_train, x_test, y_test)"
        )
    if not zipfile.is_zipfile(path):
        raise HarnessError(f"{path} is not an NPZ archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise HarnessError(f"cannot read {path}: {exc}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise HarnessError(f"{path} lacks arrays {', '.join(missing)}")
    out = {}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise HarnessError(f"{path} x_{part} has shape {x.shape}, not [N, (1,) 28, 28]")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
            finite = x[np.isfinite(x)]  # NaN / inf are left to require_finite in to_split
            if finite.size and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
                raise HarnessError(f"{path} x_{part} floats must lie in [0, 1]")
        else:
            raise HarnessError(f"{path} x_{part} must be uint8 or float, not {x.dtype}")
        y = np.asarray(y).reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            raise HarnessError(f"{path} y_{part} must hold integers, not {y.dtype}")
        if len(x) != len(y):
            raise HarnessError(f"{path} x_{part} has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise HarnessError(f"{path} {part} split is empty")
        if y.min() < 0 or y.max() > 9:
            raise HarnessError(f"{path} y_{part} labels must lie in 0..9")
        out[f"x_{part}"], out[f"y_{part}"] = x, y.astype(np.int64)
    return out


def _scale(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32)[:, None] / 255.0


class _IdxDataset:
    """Shared loading of an IDX dataset with train / val / test and an optional OOD set."""

    name = ""
    title = ""
    stats = MNIST_STATS
    ood_name = ""
    ood_title = ""

    def _base(self, cfg: Any) -> dict[str, np.ndarray]:
        root = cfg_get(cfg, "root")
        if root is None:
            raise HarnessError(f"dataset {self.name} needs root: the {self.title} directory")
        files = read_idx_set(root, self.title)
        x, y = _scale(files["train_images"]), files["train_labels"].astype(np.int64)
        n_val = min(cfg_int(cfg, "val_size", 5000), len(x) // 10)
        if n_val == 0:
            raise HarnessError(
                f"{self.title} val split is empty: val_size must be >= 1 and train must hold "
                f">= 10 images (has {len(x)})"
            )
        return {
            "x_train": x[:-n_val],
            "y_train": y[:-n_val],
            "x_val": x[-n_val:],
            "y_val": y[-n_val:],
            "x_test": _scale(files["test_images"]),
            "y_test": files["test_labels"].astype(np.int64),
        }

    def _norm(self, x: np.ndarray) -> np.ndarray:
        mean, std = self.stats
        return (x - np.float32(mean)) / np.float32(std)

    def _ood(self, cfg: Any) -> dict[str, Split]:
        ood_root = cfg_get(cfg, "ood_root")
        if ood_root is None:
            return {}
        files = read_idx_set(ood_root, f"{self.ood_title} (OOD)", train=False)
        x = self._norm(_scale(files["test_images"]))
        y = np.full(len(x), -1, dtype=np.int64)
        return {self.ood_name: to_split(x, y, f"{self.name} OOD {self.ood_name}")}

    @staticmethod
    def _limit(cfg: Any, x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
        limit = cfg_int(cfg, "limit", None, lo=1)
        if limit is None or limit >= len(x):
            return x, y
        keep = np.sort(rng.permutation(len(x))[:limit])
        return x[keep], y[keep]

    def load(self, cfg: Any, seed: int) -> DataBundle:
        d = self._base(cfg)
        (r_limit,) = rngs(seed, 1)
        x_train, y_train = self._limit(cfg, d["x_train"], d["y_train"], r_limit)
        return DataBundle(
            train=to_split(self._norm(x_train), y_train, f"{self.name} train"),
            val=to_split(self._norm(d["x_val"]), d["y_val"], f"{self.name} val"),
            test=to_split(self._norm(d["x_test"]), d["y_test"], f"{self.name} test"),
            spec=SPEC,
            ood=self._ood(cfg),
        )


class MNIST(_IdxDataset):
    name = "mnist"
    title = "MNIST"
    stats = MNIST_STATS
    ood_name = "fashion_mnist"
    ood_title = "Fashion-MNIST"


class FashionMNIST(_IdxDataset):
    name = "fashion_mnist"
    title = "Fashion-MNIST"
    stats = FASHION_STATS
    ood_name = "mnist"
    ood_title = "MNIST"


class DirtyMNIST(MNIST):
    """MNIST + AmbiguousMNIST with fixed Gaussian noise; Fashion-MNIST as OOD."""

    name = "dirty_mnist"

    @staticmethod
    def _source(cfg: Any) -> str:
        source = cfg_get(cfg, "source", "packaged")
        if source not in SOURCES:
            raise HarnessError(
                f"dataset.source must be one of {', '.join(SOURCES)}, got {source!r}"
            )
        return source

    def check(self, cfg: Any) -> None:
        if self._source(cfg) == "packaged":
            from . import packaged

            packaged.check(cfg)

    def load(self, cfg: Any, seed: int) -> DataBundle:
        if self._source(cfg) == "packaged":
            from . import packaged

            return packaged.load(cfg, seed)
        amb_root = cfg_get(cfg, "ambiguous_root")
        if amb_root is None:
            raise HarnessError(
                f"dataset dirty_mnist needs ambiguous_root: a directory with {AMBIGUOUS_FILE}"
            )
        noise_std = cfg_float(cfg, "noise_std", 0.05)
        d = self._base(cfg)
        amb = read_ambiguous(amb_root)
        r_limit, r_noise = rngs(seed, 2)
        x_train = np.concatenate([d["x_train"], amb["x_train"]])
        y_train = np.concatenate([d["y_train"], amb["y_train"]])
        x_train, y_train = self._limit(cfg, x_train, y_train, r_limit)

        def dirty(x: np.ndarray) -> np.ndarray:
            return add_noise(self._norm(x), noise_std, r_noise)

        return DataBundle(
            train=to_split(dirty(x_train), y_train, "dirty_mnist train"),
            val=to_split(dirty(d["x_val"]), d["y_val"], "dirty_mnist val"),
            test=to_split(dirty(d["x_test"]), d["y_test"], "dirty_mnist test"),
            spec=SPEC,
            ambiguous=to_split(dirty(amb["x_test"]), amb["y_test"], "dirty_mnist ambiguous"),
            ood=self._ood(cfg),
        )
