"""The emulated aarch64 board (tools/arm_sim) for the tvm_arm tests: started once if needed.

Under CI (`CI=true`) a board that cannot be set up fails the tests; elsewhere they skip,
saying how to get one (`make arm-sim`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PORT = 9090


def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("arm_sim", ROOT / "tools" / "arm_sim" / "sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("arm_sim", module)
    spec.loader.exec_module(module)
    return module


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the emulated aarch64 board is required in CI: {reason}")
    pytest.skip(f"no emulated aarch64 board ({reason}); run `make arm-sim`")


@pytest.fixture(scope="session")
def arm_board() -> Iterator[ModuleType]:
    """The sim module, its server up on 127.0.0.1:PORT (stopped after if started here)."""
    module = sim()
    os.environ.setdefault("ARM_SIM_PORT", str(PORT))
    started = module.running_pid() is None
    if started and os.geteuid() != 0 and shutil.which("qemu-aarch64") is None:
        unavailable("qemu-user is not installed and this user cannot install it")
    try:
        module.start() if started else module.check()
    except module.SimError as err:
        unavailable(str(err))
    yield module
    if started:
        module.stop()
