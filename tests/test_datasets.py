"""Dataset plugins: the embedded Dirty-Digits set and the IDX / NPZ file loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.api import DataBundle, HarnessError
from plugins.datasets import (
    MNIST,
    DirtyDigits,
    DirtyDigitsConfig,
    DirtyMNIST,
    DirtyMNISTConfig,
    FashionMNIST,
    MNISTConfig,
    bnn_harness_config_schemas,
    bnn_harness_datasets,
    read_idx,
)
from plugins.datasets.digits import clean_digits, make_blends
from plugins.datasets.idx import IDX_FILES, MNIST_STATS

# ---------------------------------------------------------------- dirty digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return DirtyDigits().load(OmegaConf.structured(DirtyDigitsConfig), seed=0)


def _assert_bundle_ok(bundle: DataBundle, shape: tuple[int, ...]) -> None:
    for name, (x, y) in bundle.splits().items():
        assert x.dtype == torch.float32, name
        assert y.dtype == torch.int64, name
        assert tuple(x.shape[1:]) == shape, name
        assert len(x) == len(y) > 0, name
        assert torch.isfinite(x).all(), name
        if name.startswith("ood_"):
            assert (y == -1).all(), name
        else:
            assert y.min() >= 0 and y.max() <= 9, name


def test_digits_shapes_and_sizes(digits: DataBundle) -> None:
    assert digits.spec.input_shape == (1, 8, 8)
    assert digits.spec.num_classes == 10
    _assert_bundle_ok(digits, (1, 8, 8))
    n_train, n_val, n_test = 1078, 269, 450
    assert len(digits.train[0]) == n_train + round(0.5 * n_train)
    assert len(digits.val[0]) == n_val
    assert len(digits.test[0]) == n_test
    assert digits.ambiguous is not None and len(digits.ambiguous[0]) == n_test
    assert set(digits.ood) == {"patches", "noise"}
    assert all(len(x) == 400 for x, _ in digits.ood.values())
    assert set(digits.test[1].tolist()) == set(range(10))


def test_digits_deterministic_per_seed(digits: DataBundle) -> None:
    cfg = OmegaConf.structured(DirtyDigitsConfig)
    again = DirtyDigits().load(cfg, seed=0)
    other = DirtyDigits().load(cfg, seed=1)
    for (name, a), b, c in zip(
        digits.splits().items(), again.splits().values(), other.splits().values(), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name
        assert not torch.equal(a[0], c[0]), name


def test_digits_cfg_as_plain_namespace_and_defaults() -> None:
    ns = SimpleNamespace(ambiguous_fraction=0.25, noise_std=0.0, ood_size=7)
    bundle = DirtyDigits().load(ns, seed=3)
    assert len(bundle.train[0]) == 1078 + round(0.25 * 1078)
    assert all(len(x) == 7 for x, _ in bundle.ood.values())
    # An empty namespace falls back to the defaults.
    assert len(DirtyDigits().load(SimpleNamespace(), seed=3).ood["noise"][0]) == 400


def test_digits_ambiguous_are_blends_not_clean_images() -> None:
    ds = DirtyDigits()
    bundle = ds.load(SimpleNamespace(noise_std=0.0), seed=0)
    assert ds.stats is not None
    mean, std = ds.stats["mean"], ds.stats["std"]
    clean, _ = clean_digits()
    clean = torch.from_numpy(clean).flatten(1)
    n_clean_train = 1078
    blends = [bundle.ambiguous[0], bundle.train[0][n_clean_train:]]
    for x in blends:
        raw = (x * std + mean).flatten(1)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
        nearest = torch.cdist(raw, clean).min(dim=1).values
        assert (nearest > 1e-3).all()
    # The clean part of train is made of genuine digits.
    raw = (bundle.train[0][:n_clean_train] * std + mean).flatten(1)
    assert torch.cdist(raw, clean).min(dim=1).values.max() < 1e-4
    # With noise, the normalised clean train is (nearly) zero-mean, unit-variance.
    noisy = ds.load(SimpleNamespace(ambiguous_fraction=0.0), seed=0)
    assert len(noisy.train[0]) == n_clean_train
    assert abs(noisy.train[0].mean().item()) < 0.02
    assert abs(noisy.train[0].std().item() - 1) < 0.02


def test_make_blends_mixes_two_different_classes() -> None:
    x, y = clean_digits()
    images, labels, prov = make_blends(x, y, 300, np.random.default_rng(0))
    i, j, alpha = prov["i"], prov["j"], prov["alpha"]
    assert (y[i] != y[j]).all()
    assert ((alpha >= 0.4) & (alpha <= 0.6)).all()
    assert ((labels == y[i]) | (labels == y[j])).all()
    assert (labels == y[i]).any() and (labels == y[j]).any()
    a = alpha[:, None, None, None]
    np.testing.assert_allclose(images, a * x[i] + (1 - a) * x[j], atol=1e-6)


def test_digits_ood_sets_differ_from_digits(digits: DataBundle) -> None:
    patches, noise = digits.ood["patches"][0], digits.ood["noise"][0]
    assert patches.shape == noise.shape == (400, 1, 8, 8)
    assert patches.flatten(1).std(dim=1).min() >= 0  # finite, not all collapsed
    assert patches.flatten(1).std(dim=1).mean() > 0.3
    assert not torch.equal(patches, noise)


def test_digits_bad_cfg_is_harness_error() -> None:
    with pytest.raises(HarnessError, match="noise_std"):
        DirtyDigits().load(SimpleNamespace(noise_std=-1.0), seed=0)
    with pytest.raises(HarnessError, match="ood_size"):
        DirtyDigits().load(SimpleNamespace(ood_size=0), seed=0)


# ---------------------------------------------------------------- IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def _write_idx_set(
    root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0, gz: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (root / f"{IDX_FILES[key]}.gz").write_bytes(gzip.compress(data))
        else:
            (root / IDX_FILES[key]).write_bytes(data)
    return arrays


def _norm(images: np.ndarray) -> torch.Tensor:
    mean, std = MNIST_STATS
    return (torch.from_numpy(images).float()[:, None] / 255 - mean) / std


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_set(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / f"{IDX_FILES['train_images']}{suffix}")
    labels = read_idx(tmp_path / f"{IDX_FILES['train_labels']}{suffix}")
    np.testing.assert_array_equal(images, arrays["train_images"])
    np.testing.assert_array_equal(labels, arrays["train_labels"])


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_set(tmp_path / "mnist", gz=gz)
    fashion = _write_idx_set(tmp_path / "fashion", seed=1, gz=not gz)
    cfg = OmegaConf.structured(MNISTConfig(root=str(tmp_path / "mnist")))
    bundle = MNIST().load(cfg, seed=0)
    _assert_bundle_ok(bundle, (1, 28, 28))
    assert bundle.spec.input_shape == (1, 28, 28) and bundle.ood == {}
    # val = the last 10% (cap) of train; 20 images -> 2.
    assert len(bundle.train[0]) == 18 and len(bundle.val[0]) == 2
    torch.testing.assert_close(bundle.train[0], _norm(arrays["train_images"][:18]))
    torch.testing.assert_close(bundle.val[0], _norm(arrays["train_images"][18:]))
    torch.testing.assert_close(bundle.test[0], _norm(arrays["test_images"]))
    assert bundle.test[1].tolist() == arrays["test_labels"].tolist()

    cfg.ood_root = str(tmp_path / "fashion")
    cfg.limit = 5
    bundle = MNIST().load(cfg, seed=0)
    assert len(bundle.train[0]) == 5
    x_ood, y_ood = bundle.ood["fashion_mnist"]
    torch.testing.assert_close(x_ood, _norm(fashion["test_images"]))
    assert (y_ood == -1).all()


def test_fashion_mnist_loader(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "fashion")
    _write_idx_set(tmp_path / "mnist", seed=1)
    cfg = SimpleNamespace(root=str(tmp_path / "fashion"), ood_root=str(tmp_path / "mnist"))
    bundle = FashionMNIST().load(cfg, seed=0)
    _assert_bundle_ok(bundle, (1, 28, 28))
    assert set(bundle.ood) == {"mnist"}


def test_missing_directory_lists_expected_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(HarnessError) as info:
        MNIST().load(SimpleNamespace(root=str(missing)), seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message
    for name in IDX_FILES.values():
        assert name in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    (tmp_path / IDX_FILES["test_labels"]).unlink()
    with pytest.raises(HarnessError, match="lacks t10k-labels-idx1-ubyte"):
        MNIST().load(SimpleNamespace(root=str(tmp_path)), seed=0)


def test_unset_root_is_harness_error() -> None:
    with pytest.raises(HarnessError, match="root"):
        MNIST().load(OmegaConf.structured(MNISTConfig), seed=0)


def test_bad_magic_is_harness_error(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    path = tmp_path / IDX_FILES["train_images"]
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float instead of ubyte
    path.write_bytes(bytes(raw))
    with pytest.raises(HarnessError, match="magic"):
        read_idx(path)
    with pytest.raises(HarnessError, match="magic"):
        MNIST().load(SimpleNamespace(root=str(tmp_path)), seed=0)


def test_truncated_and_empty_files_are_harness_errors(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    path = tmp_path / IDX_FILES["train_images"]
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(HarnessError, match="needs"):
        read_idx(path)
    empty = tmp_path / "empty"
    _write_idx_set(empty, n_test=0)
    with pytest.raises(HarnessError, match="empty"):
        MNIST().load(SimpleNamespace(root=str(empty)), seed=0)


# ---------------------------------------------------------------- dirty MNIST


def _write_ambiguous(root: Path, x_test: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {
        "x_train": rng.random((6, 1, 28, 28), dtype=np.float32),
        "y_train": rng.integers(0, 10, 6),
        "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8) if x_test is None else x_test,
        "y_test": rng.integers(0, 10, 4),
    }
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "ambiguous_mnist.npz", **arrays)
    return arrays


def test_dirty_mnist(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    _write_idx_set(tmp_path / "fashion", seed=1, gz=True)
    amb = _write_ambiguous(tmp_path / "amb")
    cfg = OmegaConf.structured(
        DirtyMNISTConfig(
            source="files",
            root=str(tmp_path / "mnist"),
            ambiguous_root=str(tmp_path / "amb"),
            ood_root=str(tmp_path / "fashion"),
        )
    )
    bundle = DirtyMNIST().load(cfg, seed=0)
    _assert_bundle_ok(bundle, (1, 28, 28))
    assert len(bundle.train[0]) == 18 + 6
    assert bundle.train[1][18:].tolist() == amb["y_train"].tolist()
    assert bundle.ambiguous is not None and len(bundle.ambiguous[0]) == 4
    assert set(bundle.ood) == {"fashion_mnist"}
    # Fixed noise of std 0.05 in normalised units on the in-distribution splits.
    mean, std = MNIST_STATS
    clean = (torch.from_numpy(amb["x_train"]) - mean) / std
    residual = bundle.train[0][18:] - clean
    assert 0.04 < residual.std().item() < 0.06
    again = DirtyMNIST().load(cfg, seed=0)
    assert torch.equal(again.train[0], bundle.train[0])
    assert not torch.equal(DirtyMNIST().load(cfg, seed=1).train[0], bundle.train[0])
    cfg.limit = 10
    assert len(DirtyMNIST().load(cfg, seed=0).train[0]) == 10


def test_dirty_mnist_errors(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    cfg = SimpleNamespace(source="files", root=str(tmp_path / "mnist"), ambiguous_root=None)
    with pytest.raises(HarnessError, match="ambiguous_root"):
        DirtyMNIST().load(cfg, seed=0)
    cfg.ambiguous_root = str(tmp_path / "amb")
    with pytest.raises(HarnessError, match=r"ambiguous_mnist\.npz"):
        DirtyMNIST().load(cfg, seed=0)
    bad = np.full((4, 28, 28), np.nan, dtype=np.float32)
    _write_ambiguous(tmp_path / "amb", x_test=bad)
    with pytest.raises(HarnessError, match="NaN"):
        DirtyMNIST().load(cfg, seed=0)


# ---------------------------------------------------------------- hooks


def test_hooks_register_datasets_and_schemas() -> None:
    names = [d.name for d in bnn_harness_datasets()]
    assert names == ["dirty_digits", "mnist", "fashion_mnist", "dirty_mnist", "regression1d"]
    schemas = bnn_harness_config_schemas()
    assert {s.group for s in schemas} == {"dataset"}
    for schema in schemas:
        node = OmegaConf.structured(schema.node)
        assert node.name in names
    node = OmegaConf.structured(DirtyMNISTConfig)
    node.ood_root = "/somewhere"
    node.limit = 3
    assert node.source == "packaged" and node.root is None
    assert OmegaConf.is_missing(OmegaConf.structured(MNISTConfig), "root")
    with pytest.raises(Exception, match="sourc"):
        node.sourc = "files"
