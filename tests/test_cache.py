"""Posteriors as data: saved without pickle, cached by training config."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import cache, cli, registry, runner
from harness.api import HarnessError, MethodBase, Posterior
from harness.training import FitConfig, state_tensors
from plugins.datasets import DirtyDigits, DirtyDigitsConfig
from plugins.methods.deterministic import fit_map
from plugins.models import MLP, MLPConfig


def _posterior(value: float) -> Posterior:
    return Posterior("toy", {"net.w": torch.full((2, 3), value)}, {"note": "x"})


def test_roundtrip_is_safetensors_and_json(tmp_path: Path) -> None:
    post = _posterior(1.5)
    post.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "meta.json",
        "tensors.safetensors",
    ]
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["method"] == "toy"
    back = Posterior.load(tmp_path / "p")
    assert torch.equal(back.tensors["net.w"], post.tensors["net.w"])
    assert back.meta == {"note": "x"}
    assert list(back.subset("net")) == ["w"]
    assert torch.equal(back.subset("net")["w"], post.tensors["net.w"])


def test_fit_once_then_load(tmp_path: Path) -> None:
    calls: list[int] = []

    def fit() -> Posterior:
        calls.append(1)
        return _posterior(float(len(calls)))

    parts = {"method": "toy", "fit": {"epochs": 3}, "seed": 0}
    first, cached1 = cache.fit_or_load(tmp_path, "toy", parts, fit)
    second, cached2 = cache.fit_or_load(tmp_path, "toy", dict(parts), fit)
    assert (cached1, cached2) == (False, True)
    assert len(calls) == 1
    assert torch.equal(first.tensors["net.w"], second.tensors["net.w"])
    _, cached3 = cache.fit_or_load(tmp_path, "toy", {**parts, "seed": 1}, fit)
    assert not cached3 and len(calls) == 2
    assert not list(tmp_path.glob(".staging-*"))


def test_key_ignores_order() -> None:
    assert cache.key({"a": 1, "b": {"c": 2}}) == cache.key({"b": {"c": 2}, "a": 1})
    assert cache.key({"a": 1}) != cache.key({"a": 2})


# --- a cache that checks itself -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> Posterior:
    """A small real posterior: an MLP trained for one epoch on the embedded digits."""
    data = DirtyDigits().load(DirtyDigitsConfig(), 0)
    factory = MLP().factory(MLPConfig(hidden=[16]), data.spec)
    torch.manual_seed(0)
    net = fit_map(factory, data, FitConfig(epochs=1))
    return Posterior("deterministic", state_tensors("net", net), {"note": "one epoch"})


class Fitter:
    """Counts fits, so a test can tell a cache hit from a retrain."""

    def __init__(self, posterior: Posterior):
        self.posterior, self.calls = posterior, 0

    def __call__(self) -> Posterior:
        self.calls += 1
        return self.posterior


PARTS = {"method": "deterministic", "fit": {"epochs": 1}, "seed": 0}


def _entry(root: Path) -> Path:
    (entry,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return entry


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_format(path: Path) -> None:
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "format": 1}))


DAMAGE = {
    "flipped tensors": ("tensors.safetensors", _flip, "tensors.safetensors does not match"),
    "truncated tensors": ("tensors.safetensors", _truncate, "tensors.safetensors does not match"),
    "flipped meta": ("meta.json", _flip, "meta.json does not match"),
    "missing tensors": ("tensors.safetensors", Path.unlink, "tensors.safetensors is missing"),
    "unparsable record": (cache.ENTRY, _truncate, "entry.json is unreadable"),
    "wrong format": (cache.ENTRY, _set_format, "format version 1, expected 2"),
    "unversioned": (cache.ENTRY, Path.unlink, "no entry.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_bad_entry_is_reported_moved_aside_and_retrained(
    tmp_path: Path, trained: Posterior, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    file, spoil, problem = DAMAGE[damage]
    fit = Fitter(trained)
    cache.fit_or_load(tmp_path, "deterministic", PARTS, fit)
    entry = _entry(tmp_path)
    assert cache.read_entry(entry)[1] is None
    spoil(entry / file)
    assert problem in str(cache.read_entry(entry)[1])
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        _, cached = cache.fit_or_load(tmp_path, "deterministic", PARTS, fit)
    assert (cached, fit.calls) == (False, 2)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert entry.name in warning and problem in warning and "retraining" in warning
    (moved,) = (tmp_path / cache.QUARANTINE).iterdir()  # kept, not deleted
    assert moved.name.startswith(entry.name) and problem in (moved / "QUARANTINED.txt").read_text()
    assert cache.read_entry(_entry(tmp_path))[1] is None  # the retrained entry is whole
    again, cached = cache.fit_or_load(tmp_path, "deterministic", PARTS, fit)
    assert (cached, fit.calls) == (True, 2)
    assert torch.equal(again.tensors["net.1.weight"], trained.tensors["net.1.weight"])


def test_entry_records_versions_hashes_and_config(tmp_path: Path, trained: Posterior) -> None:
    config = {"name": "deterministic", "fit": {"epochs": 1}}
    cache.fit_or_load(tmp_path, "deterministic", PARTS, Fitter(trained), config)
    record = json.loads((_entry(tmp_path) / cache.ENTRY).read_text())
    assert record["format"] == cache.FORMAT
    assert record["harness_version"] == cache.harness_version() != ""
    assert record["trained_with"] == config
    assert set(record["sha256"]) == set(cache.HASHED)
    assert (
        record["sha256"]["tensors.safetensors"]
        == hashlib.sha256((_entry(tmp_path) / "tensors.safetensors").read_bytes()).hexdigest()
    )


def _staging(root: Path, suffix: str, pid: int | None) -> Path:
    path = root / f"{cache.STAGING}{suffix}"
    path.mkdir(parents=True)
    (path / "tensors.safetensors").write_bytes(b"half a posterior")
    if pid is not None:
        owner = {"pid": pid, "host": socket.gethostname(), "created": "now"}
        (path / cache.OWNER).write_text(json.dumps(owner))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftover_staging_is_cleaned(
    tmp_path: Path, trained: Posterior, caplog: pytest.LogCaptureFixture
) -> None:
    dead = _staging(tmp_path, "dead", _dead_pid())
    old = _staging(tmp_path, "old", None)
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    live = _staging(tmp_path, "live", os.getpid())  # a parallel job still writing
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        cache.fit_or_load(tmp_path, "deterministic", PARTS, Fitter(trained))
    assert not dead.exists() and not old.exists() and live.exists()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "staging-dead" in warning and "is gone" in warning and "min old" in warning


def test_a_fit_that_raises_leaves_nothing(tmp_path: Path) -> None:
    def fail() -> Posterior:
        raise HarnessError("training diverged")

    with pytest.raises(HarnessError):
        cache.fit_or_load(tmp_path, "deterministic", PARTS, fail)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_drift_warning_names_options_outside_the_key(
    tmp_path: Path, trained: Posterior, caplog: pytest.LogCaptureFixture
) -> None:
    """A method without fit_options hears that its hit was trained with other option values."""
    trained_with = {"name": "third_party", "fit": {"epochs": 1}, "members": 3, "samples": 10}
    now = {**trained_with, "members": 5, "samples": 10}
    fit = Fitter(trained)
    cache.fit_or_load(tmp_path, "third_party", PARTS, fit, trained_with, check_drift=True)
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        cache.fit_or_load(tmp_path, "third_party", PARTS, fit, now, check_drift=False)
        assert not caplog.records  # a method that declares fit_options: its contract
        _, cached = cache.fit_or_load(tmp_path, "third_party", PARTS, fit, now, check_drift=True)
    assert cached and fit.calls == 1
    (record,) = caplog.records
    assert "method.members=3 (now 5)" in record.getMessage()
    assert "samples" not in record.getMessage() and "fit_options" in record.getMessage()
    # configs of another method (a base trained under MC dropout's name) are not compared
    assert cache.drift({**trained_with, "name": "mc_dropout"}, now, []) == {}
    assert cache.drift(trained_with, now, ["members"]) == {}


def test_runner_retrains_a_corrupt_entry(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=deterministic", "method.fit.epochs=1")
    job = runner.prepare(cfg, registry.default())
    first, cached = runner.fit_or_load(job, cfg.method)
    assert not cached
    entry = _entry(tmp_path / "cache")
    assert json.loads((entry / cache.ENTRY).read_text())["trained_with"]["name"] == "deterministic"
    _flip(entry / "tensors.safetensors")
    second, cached = runner.fit_or_load(job, cfg.method)
    assert not cached and len(list((tmp_path / "cache" / cache.QUARANTINE).iterdir())) == 1
    assert torch.equal(first.tensors["net.1.weight"], second.tensors["net.1.weight"])  # seeded
    assert runner.fit_or_load(job, cfg.method)[1]


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = cli.main(["cache", *args])
    return code, capsys.readouterr().out


def test_cache_command_list_verify_prune(
    tmp_path: Path, trained: Posterior, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "store"
    for seed in (0, 1):
        cache.fit_or_load(root, "deterministic", {**PARTS, "seed": seed}, Fitter(trained))
    code, out = _cli(capsys, "verify", "--dir", str(root))
    assert code == 0 and "2 entries" in out and "0 bad" in out
    good, bad = sorted(p for p in root.iterdir())
    _truncate(bad / "tensors.safetensors")
    cache.fit_or_load(root, "deterministic", PARTS | {"seed": 2}, Fitter(trained))
    cache.quarantine(root, _entry_named(root, PARTS | {"seed": 2}), "a test put it there")
    _staging(root, "dead", _dead_pid())
    code, out = _cli(capsys, "list", "--dir", str(root))
    assert code == 0
    assert f"deterministic  {good.name.split('-')[1]}  deterministic" in out
    assert cache.harness_version() in out and "ok" in out and "BAD: tensors" in out
    assert f"1 folder(s) in {cache.STAGING}" in out and f"1 folder(s) in {cache.QUARANTINE}" in out
    code, out = _cli(capsys, "verify", "--dir", str(root))
    assert code == 1 and f"bad: {bad.name}: tensors.safetensors does not match" in out
    code, out = _cli(capsys, "prune", "--dir", str(root))
    assert code == 0 and "3 removed" in out
    assert sorted(p.name for p in root.iterdir()) == [cache.QUARANTINE, good.name]
    assert not list((root / cache.QUARANTINE).iterdir())
    assert _cli(capsys, "verify", "--dir", str(root))[0] == 0
    code, out = _cli(capsys, "prune", "--dir", str(root), "--older-than", "0")
    assert "older than 0 days" in out and not good.exists()


def _entry_named(root: Path, parts: dict) -> Path:
    return root / f"deterministic-{cache.key(parts)}"


def test_only_a_class_that_sets_fit_options_declares_them() -> None:
    class Forgot(MethodBase):
        name = "forgot"

    class Stated(MethodBase):
        name = "stated"
        fit_options = ()

    forgot = Forgot()
    forgot.fit_options = ()  # what the registry binds on a plugin without them
    assert not cache.declares_fit_options(forgot)
    assert cache.declares_fit_options(Stated())
    assert not cache.declares_fit_options(object())


def test_ensemble_members_are_in_the_cache_key(make_cfg) -> None:
    """Before: members=2 reused a cached 5-member ensemble (members was outside the key)."""
    keys = []
    for members in (2, 5):
        cfg = make_cfg("method=ensemble", f"method.members={members}")
        keys.append(
            cache.key(
                runner.training_key(runner.prepare(cfg, registry.default()), cfg.method, "ensemble")
            )
        )
    assert keys[0] != keys[1]
