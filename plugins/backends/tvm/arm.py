"""64-bit ARM: cross-compile for aarch64 + NEON, export with a cross compiler, run over TVM RPC.

The board side is TVM's stock RPC server (`python -m tvm.exec.rpc_server`, optionally
registered with a tracker under a key such as "rasp4b"), as the seed ran its Raspberry
Pis. The host builds, exports a shared library with Debian's aarch64-linux-gnu-gcc,
uploads it and drives the Relax VM remotely; every timed call includes the network
round trips, as it did in the seed.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import HarnessError
from plugins.backends.tvm import TVMArmConfig

TRIPLE = "aarch64-linux-gnu"
ELF_MACHINE_AARCH64 = 183


def target(mcpu: str = "", cores: int = 4):
    """aarch64 with NEON; `mcpu` (e.g. cortex-a72) lets LLVM schedule for that core."""
    import tvm

    spec: dict[str, Any] = {"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon"]}
    spec["num-cores"] = cores
    if mcpu:
        spec["mcpu"] = mcpu
    return tvm.target.Target(spec)


def check_compiler(cc: str) -> str:
    path = shutil.which(cc)
    if path is None:
        raise HarnessError(
            f"backend.cc '{cc}' not found: install Debian's gcc-aarch64-linux-gnu "
            "(apt-get install gcc-aarch64-linux-gnu) or point backend.cc at a cross compiler"
        )
    return path


def export(ex: Any, path: Path, cc: str) -> Path:
    """The executable as an aarch64 shared library a remote TVM runtime can load."""
    check_compiler(cc)
    ex.export_library(str(path), cc=cc)
    return path


def elf_machine(path: Path) -> int:
    """e_machine of an ELF file (183: AArch64), to check what was exported."""
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise HarnessError(f"{path} is not an ELF file")
    return int.from_bytes(head[18:20], "little")


class Session:
    """One RPC session to a board (or an emulator), reused for every batch size."""

    def __init__(self, cfg: TVMArmConfig):
        from tvm import rpc

        self.cfg = cfg
        self.where = f"{cfg.host}:{cfg.tracker_port or cfg.port}"
        try:
            if cfg.tracker_port:
                tracker = rpc.connect_tracker(cfg.host, cfg.tracker_port)
                self.remote = tracker.request(cfg.key, session_timeout=cfg.session_timeout_s)
                self.where += f" key={cfg.key}"
            else:
                self._probe(cfg.host, cfg.port)
                self.remote = rpc.connect(cfg.host, cfg.port, session_timeout=cfg.session_timeout_s)
        except HarnessError:
            raise
        except Exception as err:
            raise HarnessError(
                f"no TVM RPC server for backend=tvm_arm at {self.where}: {err}. Start "
                "`python -m tvm.exec.rpc_server` on the board (with --tracker and --key to "
                "register it), then set backend.host/port (or tracker_port and key)"
            ) from err
        self._dir = Path(tempfile.mkdtemp(prefix="tvm_arm_"))
        self._count = 0
        self.device = "emulated" if cfg.emulated or self._reported() == "emulated" else "board"

    def _reported(self) -> str:
        """What the server says it is: our rpc_server.py under arm-sim answers "emulated"."""
        try:
            ask = self.remote.get_function("bnn_harness.device_kind")
            return str(ask()) if ask is not None else ""
        except Exception:  # a stock server has no such function: a board, unless cfg says
            return ""

    def close(self) -> None:
        """Drop the session: the server serves one at a time, so the next client can connect."""
        import gc

        self.remote = None
        gc.collect()
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def _probe(host: str, port: int) -> None:
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as err:
            raise HarnessError(
                f"no TVM RPC server for backend=tvm_arm at {host}:{port} ({err.strerror}). "
                "Start `python -m tvm.exec.rpc_server --host 0.0.0.0 --port "
                f"{port}` on the board, or use a tracker (backend.tracker_port, backend.key)"
            ) from err

    def load(self, ex: Any):
        """Export, upload and load one module; returns (the remote function, an uploader)."""
        import tvm
        from tvm import relax

        self._count += 1
        lib = export(ex, self._dir / f"bnn_{self._count}.so", self.cfg.cc)
        self.remote.upload(str(lib))
        module = self.remote.load_module(lib.name)
        dev = self.remote.cpu()
        vm = relax.VirtualMachine(module, dev)

        def put(array: np.ndarray):
            return tvm.runtime.tensor(array, dev)

        def call(*args: Any) -> Any:
            # A remote tuple comes back as an opaque handle; the stateful interface
            # fetches its fields one by one (copied back by `numpy()` in the caller).
            vm.set_input("main", *args)
            vm.invoke_stateful("main")
            return vm.get_outputs("main")

        return call, put

    def describe(self) -> dict[str, Any]:
        """`tags` become MLflow run tags: emulated timings must never pass for ARM timings."""
        emulated = self.device == "emulated"
        return {
            "device": f"rpc {self.where}",
            "emulated": emulated,
            "tags": {"device": self.device},
        }


def connect(cfg: TVMArmConfig) -> Session:
    return Session(cfg)
