"""A generated set of bad configs and inputs: each is refused in one line and writes nothing.

Every case goes through `harness.cli.main(["run", ...])` as a user's command would
(in-process for speed; a few through the installed command), and must give a non-zero
exit, exactly one non-empty stderr line with no traceback, no MLflow run and no cache
entry. Bad data comes from a small dataset plugin registered in this process and from
IDX files written to tmp for `dataset=mnist`.
"""

from __future__ import annotations

import gzip
import sqlite3
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pluggy
import pytest
import torch

from harness import api, cli, registry
from harness.api import ConfigSchema, DataBundle, DataSpec
from tests.conftest import FAST, store_overrides
from tests.test_cli import bnn

hookimpl = pluggy.HookimplMarker("bnn_harness")
MODES = [
    "nan_train",
    "inf_test",
    "nan_val",
    "neg_inf_ood",
    "nan_ambiguous",
    "empty_train",
    "empty_val",
    "empty_test",
    "empty_ood",
    "ragged_train",
    "ragged_test",
    "ragged_ood",
    "labels_too_big",
    "labels_negative",
    "wrong_shape",
]


@dataclass
class FuzzDataConfig:
    name: str = "fuzzdata"
    mode: str = "nan_train"


class FuzzData(getattr(api, "DatasetBase", object)):  # type: ignore[misc]
    """Four-feature blobs, broken as `mode` says."""

    name = "fuzzdata"

    def check(self, cfg: Any) -> None:
        return None

    def load(self, cfg: Any, seed: int) -> DataBundle:
        g = torch.Generator().manual_seed(seed)

        def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

        parts = {k: split(60) for k in ("train", "val", "test", "ambiguous", "ood")}
        mode = cfg.mode
        what, _, how = mode.partition("_")
        if what in ("nan", "inf", "neg"):
            target = how.removeprefix("inf_")
            x, y = parts[target]
            x = x.clone()
            x[3, 1] = {"nan": float("nan"), "inf": float("inf"), "neg": -float("inf")}[what]
            parts[target] = (x, y)
        elif what == "empty":
            parts[how] = (parts[how][0][:0], parts[how][1][:0])
        elif what == "ragged":
            parts[how] = (parts[how][0], parts[how][1][:-7])
        elif mode == "labels_too_big":
            parts["train"] = (parts["train"][0], parts["train"][1] + 5)
        elif mode == "labels_negative":
            parts["val"] = (parts["val"][0], parts["val"][1] - 4)
        elif mode == "wrong_shape":
            parts["test"] = (parts["test"][0][:, :3], parts["test"][1])
        return DataBundle(
            parts["train"],
            parts["val"],
            parts["test"],
            DataSpec((4,), 3),
            ambiguous=parts["ambiguous"],
            ood={"far": parts["ood"]},
        )


class FuzzPlugin:
    @hookimpl
    def bnn_harness_datasets(self) -> list[Any]:
        return [FuzzData()]

    @hookimpl
    def bnn_harness_config_schemas(self) -> list[ConfigSchema]:
        return [ConfigSchema("dataset", "fuzzdata", FuzzDataConfig)]


@dataclass
class Case:
    name: str
    args: list[str]
    setup: Callable[[Path], list[str]] = field(default=lambda root: [])
    subprocess: bool = False


def _idx(path: Path, magic: int, shape: tuple[int, ...], data: bytes | None = None) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in shape)
    body = data if data is not None else bytes(int(np.prod(shape)))
    path.write_bytes(header + body)


def _mnist(kind: str) -> Callable[[Path], list[str]]:
    """An IDX folder broken as `kind` says; returns the overrides that point at it."""

    def setup(root: Path) -> list[str]:
        data = root / "mnist"
        data.mkdir()
        files = {
            "train-images-idx3-ubyte": (0x803, (50, 28, 28)),
            "train-labels-idx1-ubyte": (0x801, (50,)),
            "t10k-images-idx3-ubyte": (0x803, (20, 28, 28)),
            "t10k-labels-idx1-ubyte": (0x801, (20,)),
        }
        for name, (magic, shape) in files.items():
            _idx(data / name, magic, shape)
        victim = data / "train-images-idx3-ubyte"
        if kind == "missing_dir":
            return ["dataset=mnist", f"dataset.root={root}/nowhere"]
        if kind == "empty_dir":
            for f in data.iterdir():
                f.unlink()
        elif kind == "truncated":
            victim.write_bytes(victim.read_bytes()[:1000])
        elif kind == "header_only":
            victim.write_bytes(victim.read_bytes()[:10])
        elif kind == "bad_magic":
            _idx(victim, 0x1234, (50, 28, 28))
        elif kind == "unreadable":  # a folder where a file should be: unreadable even as root
            victim.unlink()
            victim.mkdir()
        elif kind == "ragged":
            _idx(data / "train-labels-idx1-ubyte", 0x801, (49,))
        elif kind == "labels_big":
            _idx(data / "t10k-labels-idx1-ubyte", 0x801, (20,), bytes([42] * 20))
        elif kind == "bad_gzip":
            victim.unlink()
            (data / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
        elif kind == "truncated_gzip":
            blob = gzip.compress(victim.read_bytes())
            victim.unlink()
            (data / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
        elif kind == "empty_split":
            _idx(data / "t10k-images-idx3-ubyte", 0x803, (0, 28, 28))
            _idx(data / "t10k-labels-idx1-ubyte", 0x801, (0,))
        elif kind == "wrong_image_shape":
            _idx(victim, 0x803, (50, 8, 8))
        return ["dataset=mnist", f"dataset.root={data}", "dataset.val_size=10", "model=mlp"]

    return setup


def _locked_store(root: Path) -> list[str]:
    """A store that exists and is held under an exclusive lock for the whole command."""
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.search_experiments()  # creates the tables
    db = sqlite3.connect(root / "mlflow.db", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    _HELD.append(db)
    return ["tracking.lock_wait_s=0.5"]


_HELD: list[sqlite3.Connection] = []


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # Unknown plugin names, in every group (and the reference's).
    for group in (
        "method",
        "backend",
        "dataset",
        "model",
        "quant",
        "method@reference.method",
        "backend@reference.backend",
    ):
        for name in ("bogus", "SVI", "svi2", "torch-"):
            add(Case(f"unknown {group}={name}", [f"{group}={name}"]))
    # Misspelled keys.
    for key in (
        "method.sampels=3",
        "timing.round=3",
        "tracking.ur=x",
        "seeds=1",
        "batchsize=4",
        "dataset.noise=0.1",
        "model.widht=3",
        "backend.mdoe=x",
        "quant.bit=4",
        "cache=x",
        "reference.method.sample=3",
        "method.fit.epoch=3",
        "resum=true",
    ):
        add(Case(f"misspelled {key}", [key]))
    # Wrong types.
    for value in (
        "seed=abc",
        "seed=1.5",
        "batch_size=abc",
        "batch_sizes=abc",
        "batch_sizes=[a,b]",
        "eval_batch_size=x",
        "moment_samples=1.5",
        "timing.rounds=x",
        "timing.min_block_s=abc",
        "resume=maybe",
        "method.fit.epochs=abc",
        "dataset.noise_std=abc",
        "tracking.lock_wait_s=soon",
        "method.samples=[1,2]",
        "seed={a:1}",
    ):
        add(Case(f"wrong type {value}", [value]))
    # Out-of-range numbers (negative batch sizes, zero rounds, ...).
    for value in (
        "batch_size=0",
        "batch_size=-1",
        "batch_size=-100",
        "batch_sizes=[1,0]",
        "batch_sizes=[-4]",
        "batch_sizes=[]",
        "eval_batch_size=0",
        "eval_batch_size=-1",
        "moment_samples=0",
        "moment_samples=-5",
        "timing.rounds=0",
        "timing.rounds=-1",
        "timing.warmup=-1",
        "timing.min_block_s=-1",
        "timing.min_block_s=0",
        "timing.min_block_s=nan",
        "method.samples=0",
        "method.samples=-3",
        "reference.method.samples=0",
    ):
        add(Case(f"out of range {value}", [value]))
    for value in (
        "method.samples=0",
        "method.samples=-1",
    ):
        add(Case(f"mc_dropout {value}", ["method=mc_dropout", value]))
    for value in ("method.members=0", "method.members=-2"):
        add(Case(f"ensemble {value}", ["method=ensemble", value]))
    for value in ("quant.bits=0", "quant.bits=1", "quant.bits=64", "quant.bits=-3"):
        add(Case(f"vpq {value}", ["quant=vpq", value]))
    # Bad data from the in-process plugin, and bad IDX files.
    for mode in MODES:
        add(Case(f"data {mode}", ["dataset=fuzzdata", f"dataset.mode={mode}", "model=mlp"]))
    for kind in (
        "missing_dir",
        "empty_dir",
        "truncated",
        "header_only",
        "bad_magic",
        "unreadable",
        "ragged",
        "labels_big",
        "bad_gzip",
        "truncated_gzip",
        "empty_split",
        "wrong_image_shape",
    ):
        add(Case(f"mnist {kind}", [], _mnist(kind)))
    # The store: held locked by another process, or not a store at all.
    add(Case("locked store", [], _locked_store))
    add(Case("store uri scheme", ["tracking.uri=bogus://nowhere"]))
    # A few through the installed command, as a shell would run them.
    add(Case("cli unknown method", ["method=bogus"], subprocess=True))
    add(Case("cli misspelled key", ["timing.round=3"], subprocess=True))
    add(Case("cli negative batch", ["batch_size=-2"], subprocess=True))
    add(Case("cli bad sweep value", ["-m", "seed=0,x"], subprocess=True))
    return cases


CASES = _cases()


@pytest.fixture
def fuzz_plugin() -> Iterator[None]:
    manager = registry.default().manager
    plugin = FuzzPlugin()
    manager.register(plugin, name="fuzzdata [tests]")
    try:
        yield
    finally:
        manager.unregister(plugin)


def _stored_runs(root: Path) -> int:
    if not (root / "mlflow.db").exists():
        return 0
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return len(mlflow.search_runs(search_all_experiments=True))


def _problems(case: Case, root: Path, code: int, stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    found = []
    if code == 0:
        found.append("exit 0")
    if len(lines) != 1:
        found.append(f"{len(lines)} stderr lines: {lines[:4]}")
    if "Traceback" in stderr:
        found.append("traceback")
    if _stored_runs(root):
        found.append("an MLflow run was written")
    cache = root / "cache"
    if cache.exists() and any(cache.iterdir()):
        found.append("a cache entry was written")
    return found


@pytest.mark.slow  # ~1 s per case on a shared 2-core machine
def test_bad_inputs_are_refused_in_one_line(
    tmp_path: Path,
    fuzz_plugin: None,
    capfd: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    assert len(CASES) >= 100
    broken: dict[str, list[str]] = {}
    for i, case in enumerate(CASES):
        root = tmp_path / f"c{i}"
        root.mkdir()
        try:
            extra = case.setup(root)
            args = [
                *FAST,
                *store_overrides(root),
                f"hydra.run.dir={root}/run",
                f"hydra.sweep.dir={root}/sweep",
                *extra,
                *case.args,
            ]
            if case.subprocess:
                out = bnn("run", *args, cwd=root)
                code, stderr = out.returncode, out.stderr
            else:
                capfd.readouterr()
                code = cli.main(["run", *args])
                stderr = capfd.readouterr().err
        finally:
            while _HELD:
                _HELD.pop().close()
        problems = _problems(case, root, code, stderr)
        if problems:
            broken[case.name] = problems
    line = f"fuzz: {len(CASES)} bad inputs, {len(CASES) - len(broken)} refused cleanly"
    print(line)
    request.node.user_properties.append(("summary", line))  # conftest prints it at the end
    assert not broken, "\n".join(f"{k}: {v}" for k, v in broken.items())
