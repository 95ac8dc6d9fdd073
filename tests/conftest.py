"""Shared fixtures: a composed config that trains in seconds and writes only to tmp_path."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from harness import config, registry

CONF = Path(__file__).resolve().parent.parent / "conf"
BIN = Path(sys.executable).parent
FAST = [
    "method.fit.epochs=3",
    "reference.method.fit.epochs=3",
    "reference.method.samples=10",
    "batch_sizes=[1,4]",
    "timing.rounds=2",
    "timing.warmup=1",
    "timing.min_block_s=0.001",
    "moment_samples=20",
]


def store_overrides(root: Path) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{root}/mlflow.db",
        f"tracking.artifacts={root}/artifacts",
        f"cache_dir={root}/cache",
    ]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the group markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `make test`'s workers (pytest-xdist, --dist loadgroup) every test on the
    emulated board runs in one worker: the board is one server on one port, started by
    the first test that needs it."""
    for item in items:
        if "arm_board" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("arm_board"))


@pytest.fixture(scope="session", autouse=True)
def _board_tests_grouped(request: pytest.FixtureRequest) -> None:
    """A worker whose board tests lost their group finds the board busy half-way through
    the run; fail every test at once with the cause instead (pytest 9.2 with xdist 3.8)."""
    if not getattr(request.config.option, "loadgroup", False):
        return
    board = [i.nodeid for i in request.session.items if "arm_board" in i.fixturenames]
    lost = [nodeid for nodeid in board if not nodeid.endswith("@arm_board")]
    if lost:
        pytest.fail(
            f"pytest-xdist did not group {lost[0]} with the other board tests "
            "(pytest-xdist#1386): install pytest<9.2 or run with TEST_WORKERS=0"
        )


def pytest_terminal_summary(terminalreporter) -> None:
    """Lines a test left for the closing summary (user property "summary"): they come back
    from xdist's workers with the test's report, where a worker's own output is lost."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get(
        "failed", []
    ):
        for key, value in getattr(report, "user_properties", []):
            if key == "summary" and report.when == "call":
                terminalreporter.write_line(str(value))


@pytest.fixture(scope="session", autouse=True)
def _schemas() -> None:
    config.register(registry.default())


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_session() -> Iterator[None]:
    """Fails the session, after killing them, if the tests left child processes running
    (a MetaSchedule `popen_worker` once ran on for minutes after `make test`)."""
    yield
    psutil = pytest.importorskip("psutil")
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    if loky is not None and loky._executor is not None:  # joblib keeps its workers for reuse
        loky._executor.shutdown(wait=True, kill_workers=True)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a local Ray cluster stops at exit
        ray.shutdown()
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=5)
    left = []
    for proc in alive:
        try:
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    if left:
        pytest.fail("child processes left running (now killed):\n" + "\n".join(left))


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, root: Path | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "config", overrides=[*FAST, *store_overrides(root or tmp_path), *overrides]
            )

    return make


def cli_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
