"""backend=tvm_arm: the aarch64 cross-build and export, the error without a server, and every
kind of program run on the emulated aarch64 board (tools/arm_sim) against host TVM and eager
PyTorch, with the same random draws; the runner's honest labels for emulated runs; MetaSchedule
measuring on the board through its RPC runner."""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from arm_sim_support import PORT, arm_board, sim  # noqa: F401  (session fixture)
from omegaconf import DictConfig

from benchmarks.arm_agreement import eager, outputs  # the measurement this test bounds
from harness import registry, runner
from harness.api import HarnessError, InferenceProgram, MomentOp
from plugins.backends.tvm import TVMArmConfig, TVMConfig, arm, tuning
from plugins.backends.tvm.arm import ELF_MACHINE_AARCH64, elf_machine
from plugins.backends.tvm.backend import TVMArmBackend, TVMBackend
from plugins.methods.pfp.program import PFPProgram

needs_cc = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="Debian's gcc-aarch64-linux-gnu is not installed (.ci/run installs it)",
)


def _program() -> PFPProgram:
    g = torch.Generator().manual_seed(0)
    conv = {
        "mean_w": torch.randn(4, 1, 3, 3, generator=g) / 3,
        "var_w": 0.01 * torch.rand(4, 1, 3, 3, generator=g),
        "mean_b": torch.zeros(4),
        "var_b": 0.01 * torch.rand(4, generator=g),
    }
    return PFPProgram(
        [
            MomentOp("conv2d", conv, {"first": True, "padding": 1}),
            MomentOp("relu"),
            MomentOp("maxpool2d", attrs={"kernel": 2, "stride": 2}),
            MomentOp("flatten"),
        ]
    )


@needs_cc
@pytest.mark.parametrize("tune", ["none", "default"])
def test_cross_build_exports_an_aarch64_library(tmp_path: Path, tune: str) -> None:
    x = torch.randn(2, 1, 8, 8)
    entries = TVMArmBackend().export(_program(), x, TVMArmConfig(tune=tune), tmp_path)
    lib = tmp_path / entries["library"]
    assert lib.exists() and elf_machine(lib) == ELF_MACHINE_AARCH64
    assert (tmp_path / entries["runner"]).exists() and entries["draws"] == []


def test_missing_cross_compiler_is_a_clear_error(tmp_path: Path) -> None:
    cfg = TVMArmConfig(cc="no-such-aarch64-gcc")
    with pytest.raises(HarnessError, match="gcc-aarch64-linux-gnu"):
        TVMArmBackend().export(_program(), torch.randn(1, 1, 8, 8), cfg, tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_a_clear_error() -> None:
    cfg = TVMArmConfig(port=_free_port())
    with pytest.raises(HarnessError, match="no TVM RPC server"):
        TVMArmBackend().compile(_program(), torch.randn(1, 1, 8, 8), cfg)


def trained_program(make_cfg: Callable[..., DictConfig], *overrides: str) -> InferenceProgram:
    """A method's program on a posterior trained for a few epochs (cached under tmp_path)."""
    job = runner.prepare(make_cfg(*overrides), registry.default())
    posterior, _ = runner.fit_or_load(job, job.cfg.method)
    return runner.make_program(job, posterior, job.cfg.method).eval(), job.data.test[0]


def board_cfg(**kw) -> TVMArmConfig:
    return TVMArmConfig(host="127.0.0.1", port=PORT, **kw)


@pytest.mark.slow
@pytest.mark.usefixtures("arm_board")
@pytest.mark.parametrize(
    ("overrides", "noise"),
    [
        (("method=pfp", "model=mlp"), "philox"),
        (("method=pfp", "model=lenet5"), "philox"),
        (("method=svi", "method.samples=4"), "torch"),
        (("method=mc_dropout", "method.samples=4"), "philox"),
        (("method=ensemble", "method.members=2"), "philox"),
    ],
    ids=["pfp-mlp", "pfp-lenet5", "svi", "mc_dropout-philox", "ensemble"],
)
def test_emulated_board_matches_host_tvm_and_eager(
    make_cfg: Callable[..., DictConfig], overrides: tuple[str, ...], noise: str
) -> None:
    """Same seed, same draws: fed by torch (then eager agrees too) or drawn inside the
    module (Philox: the board's numbers are the host's)."""
    program, pool = trained_program(make_cfg, *overrides)
    x = pool[:5]
    arm = TVMArmBackend()
    exe = arm.compile(program, x, board_cfg(noise=noise))
    try:
        assert exe.describe()["tags"] == {"device": "emulated"}
        on_arm = outputs(exe, x, seed=7)
        on_arm_b1 = outputs(exe, x[:1], seed=7)  # a second module on the same session
    finally:
        exe.close()
    on_host = outputs(TVMBackend().compile(program, x, TVMConfig(noise=noise)), x, seed=7)
    in_torch = outputs(eager(program, x), x, seed=7)
    assert len(on_arm) == len(in_torch) == (2 if program.kind == "moments" else 1)
    same_draws_as_eager = noise == "torch" or not program.draws(x)
    for a, h, t in zip(on_arm, on_host, in_torch, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, h, rtol=1e-4, atol=1e-4)
        if same_draws_as_eager:
            torch.testing.assert_close(a, t, rtol=1e-3, atol=1e-3)
    if program.kind == "moments":  # no draws: batch 1 is the first row of batch 5
        torch.testing.assert_close(on_arm_b1[0], on_arm[0][:1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("arm_board")
def test_emulated_run_is_tagged_and_never_a_speedup(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(
        "method=pfp", "backend=tvm_arm", "backend.host=127.0.0.1", f"backend.port={PORT}"
    )
    results = runner.run(cfg, registry.default())
    # The job gave the board back (Backend.release): the next client connects at once
    # instead of waiting out the server's 600 s session timeout.
    sessions, connected = [], threading.Event()

    def connect() -> None:
        sessions.append(arm.open_remote(board_cfg()))
        connected.set()

    threading.Thread(target=connect, daemon=True).start()
    assert connected.wait(90), "the finished job's RPC session still holds the board"
    sessions.clear()  # closes the session
    assert not any(k.startswith(("speedup/", "lat/")) for k in results)
    assert results["lat_emulated/b1_ms"] > 0 and results["ref/b1_ms"] > 0
    mlflow.set_tracking_uri(cfg.tracking.uri)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["device"] == "emulated" and run.data.tags["backend"] == "tvm_arm"
    assert "speedup/b1" not in run.data.metrics and "lat_emulated/b4_ms" in run.data.metrics


def test_emulated_times_against_an_emulated_reference_keep_their_speedup() -> None:
    times = {"lat/b1_ms": 2.0, "lat/b1_iqr_ms": 0.1, "ref/b1_ms": 4.0, "speedup/b1": 2.0}
    emulated, host = {"device": "emulated"}, {}
    assert runner.apart_if_emulated(times, host, host) == times
    assert runner.apart_if_emulated(times, emulated, emulated) == times
    assert runner.apart_if_emulated(times, emulated, host) == {
        "lat_emulated/b1_ms": 2.0,
        "lat_emulated/b1_iqr_ms": 0.1,
        "ref/b1_ms": 4.0,
    }


def test_tuning_records_of_the_emulator_board_and_host_never_share_a_database(
    tmp_path: Path,
) -> None:
    from plugins.backends.tvm.backend import host_target

    dirs = {
        tuning.database_dir(tmp_path, arm.target(), "emulated"),
        tuning.database_dir(tmp_path, arm.target()),
        tuning.database_dir(tmp_path, arm.target("cortex-a72")),
        tuning.database_dir(tmp_path, host_target()),
    }
    assert len(dirs) == 4
    assert "aarch64" in tuning.database_dir(tmp_path, arm.target(), "emulated").name


@pytest.mark.slow
@pytest.mark.usefixtures("arm_board")
def test_metaschedule_measures_on_the_board_through_the_rpc_runner(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Candidates cross-compiled here and timed under qemu by RPCRunner; the executable's
    own session is released for the search and reconnects for its calls."""
    from tvm.s_tir import meta_schedule as ms

    program, pool = trained_program(make_cfg, "method=pfp", "model=mlp")
    x = pool[:1]
    root = tmp_path / "tuning"
    cfg = board_cfg(tune="metaschedule", trials=2, tuning_dir=str(root))
    exe = TVMArmBackend().compile(program, x, cfg)
    try:
        first = exe.describe()
        on_arm = outputs(exe, x, seed=0)
    finally:
        exe.close()
    assert first["tags"] == {"device": "emulated"}
    assert first["tuned_tasks"] == first["tasks"] >= 3 and first["trials"] >= first["tasks"]
    database = Path(first["database"])
    assert [p.name for p in root.iterdir()] == [database.name]
    assert "aarch64" in database.name and "emulated" in database.name

    # Every workload has a measured record: an aarch64 library ran remotely and its time
    # came back (a failed build or run is recorded as 1e10 s; x86 could not run it at all).
    db = ms.database.JSONDatabase(work_dir=str(database))
    records = db.get_all_tuning_records()
    times = [[float(t) for t in r.run_secs] for r in records]
    assert len(records) >= first["tasks"]
    assert all(ts and all(0 < t < 1 and math.isfinite(t) for t in ts) for ts in times), times

    # A second build reads the records: no search, every kernel from its record.
    again = TVMArmBackend().compile(program, x, cfg)
    try:
        second = again.describe()
        on_arm_again = outputs(again, x, seed=0)
    finally:
        again.close()
    assert second["trials"] == second["tuned_tasks"] == 0
    assert second["applied"] == second["tasks"] == first["tasks"]
    assert len(db.get_all_tuning_records()) == len(records)
    in_torch = outputs(eager(program, x), x, seed=0)
    for a, b, t in zip(on_arm, on_arm_again, in_torch, strict=True):
        torch.testing.assert_close(a, t, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.usefixtures("arm_board")
def test_a_board_behind_a_tracker_runs_the_program() -> None:
    """How a lab's boards are reached: a tracker on the host, each board's server registered
    with it under a key (`rpc_server.py HOST PORT TRACKER KEY`, as the README's board setup
    says), and the backend asking the tracker for that key (backend.tracker_port, key)."""
    import subprocess

    from tvm.rpc.tracker import Tracker

    board = sim()  # the emulated environment the arm_board fixture built
    tracker = Tracker(host="127.0.0.1", port=9290, port_end=9299, silent=True)
    cmd, env = board.python_command(
        board.SERVER, "127.0.0.1", "9390", f"127.0.0.1:{tracker.port}", "simboard"
    )
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        from tvm import rpc

        client = rpc.connect_tracker("127.0.0.1", tracker.port)
        deadline = time.monotonic() + 120
        while "simboard" not in client.text_summary():
            assert server.poll() is None, server.stderr.read().decode()[-500:]
            assert time.monotonic() < deadline, "the board never registered with the tracker"
            time.sleep(1.0)
        program, x = _program(), torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1))
        # port 9 (nothing listens): only the tracker can lead to the board
        cfg = TVMArmConfig(host="127.0.0.1", port=9, tracker_port=tracker.port, key="simboard")
        exe = TVMArmBackend().compile(program, x, cfg)
        try:
            assert exe.describe()["tags"] == {"device": "emulated"}
            on_board = outputs(exe, x, seed=0)
        finally:
            exe.close()
        on_host = outputs(TVMBackend().compile(program, x, TVMConfig()), x, seed=0)
        for a, h in zip(on_board, on_host, strict=True):
            torch.testing.assert_close(a, h, rtol=1e-5, atol=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)
        tracker.terminate()
