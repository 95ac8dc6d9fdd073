"""backend=tvm_arm: the aarch64 cross-build and export (no board needed), the RPC plumbing
against a real TVM RPC server on this host, and the error without a server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.api import HarnessError, MomentOp
from plugins.backends.tvm import TVMArmConfig
from plugins.backends.tvm.arm import ELF_MACHINE_AARCH64, elf_machine
from plugins.backends.tvm.backend import TVMArmBackend, host_target
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
    lib = TVMArmBackend().export(_program(), x, TVMArmConfig(tune=tune), tmp_path)
    assert lib.exists() and elf_machine(lib) == ELF_MACHINE_AARCH64


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


class _HostOverRPC(TVMArmBackend):
    """The tvm_arm session code with this host's target and compiler: no aarch64 runtime
    exists here, so the RPC path is exercised against an x86 server instead."""

    def target(self, cfg):
        return host_target()


@pytest.mark.slow
def test_rpc_session_runs_the_program_remotely() -> None:
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("the local TVM RPC server did not start")
                time.sleep(0.5)
        program, x = _program(), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        cfg = TVMArmConfig(port=port, cc="gcc", emulated=True)
        exe = _HostOverRPC().compile(program, x, cfg)
        mean, var = exe(x)
        ref_mean, ref_var = program(x)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
        info = exe.describe()
        assert info["emulated"] is True and info["device"].startswith("rpc 127.0.0.1")
    finally:
        server.kill()
        server.wait()
