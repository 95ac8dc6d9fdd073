"""64-bit ARM: cross-compile for aarch64 + NEON, export with a cross compiler, run over TVM RPC.

The board side is TVM's stock RPC server (`python -m tvm.exec.rpc_server`, optionally
registered with a tracker under a key such as "rasp4b"), as the seed ran its Raspberry
Pis. The host builds, exports a shared library with Debian's aarch64-linux-gnu-gcc,
uploads it and drives the Relax VM remotely; every timed call includes the network
round trips, as it did in the seed.

MetaSchedule tuning measures on the board too (`measure`): candidates are cross-compiled
and exported like the modules, and timed by MetaSchedule's RPCRunner. A server serves one
session at a time, so the executable's own session is released while a search runs and
reconnected (modules uploaded again) on the next call.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def open_remote(cfg: TVMArmConfig, timeout_s: int | None = None):
    """A new RPC session to the board: through the tracker when `tracker_port` is set."""
    from tvm import rpc

    timeout = cfg.session_timeout_s if timeout_s is None else timeout_s
    if cfg.tracker_port:
        tracker = rpc.connect_tracker(cfg.host, cfg.tracker_port)
        return tracker.request(cfg.key, session_timeout=timeout)
    return rpc.connect(cfg.host, cfg.port, session_timeout=timeout)


class Session:
    """One RPC session to a board (or an emulator), reused for every batch size.

    `release` drops it (and every remote module), so that another client (MetaSchedule's
    runner) can have the server; the next call through a loaded module reconnects and
    uploads its library again."""

    def __init__(self, cfg: TVMArmConfig):
        self.cfg = cfg
        self.where = f"{cfg.host}:{cfg.tracker_port or cfg.port}"
        if cfg.tracker_port:
            self.where += f" key={cfg.key}"
        self.remote: Any = None
        self._loaded: list[dict[str, Any]] = []  # per module: its remote VM and device
        self._connect()
        self._dir = Path(tempfile.mkdtemp(prefix="tvm_arm_"))
        self._count = 0
        self.device = "emulated" if cfg.emulated or self._reported() == "emulated" else "board"

    def _connect(self) -> None:
        try:
            if not self.cfg.tracker_port:
                self._probe(self.cfg.host, self.cfg.port)
            self.remote = open_remote(self.cfg)
        except HarnessError:
            raise
        except Exception as err:
            raise HarnessError(
                f"no TVM RPC server for backend=tvm_arm at {self.where}: {err}. Start "
                "`python -m tvm.exec.rpc_server` on the board (with --tracker and --key to "
                "register it), then set backend.host/port (or tracker_port and key)"
            ) from err

    def _reported(self) -> str:
        """What the server says it is: our rpc_server.py under arm-sim answers "emulated"."""
        try:
            ask = self.remote.get_function("bnn_harness.device_kind")
            return str(ask()) if ask is not None else ""
        except Exception:  # a stock server has no such function: a board, unless cfg says
            return ""

    def release(self) -> None:
        """Free the server for another client; loaded modules reconnect on their next call."""
        import gc

        for slot in self._loaded:
            slot.clear()
        self.remote = None
        gc.collect()  # the session closes when its last remote object is gone

    def close(self) -> None:
        """Drop the session: the server serves one at a time, so the next client can connect."""
        self.release()
        self._loaded.clear()
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
        slot: dict[str, Any] = {}
        self._loaded.append(slot)

        def loaded() -> dict[str, Any]:
            if not slot:  # first call, or the session was released since
                if self.remote is None:
                    self._connect()
                self.remote.upload(str(lib))
                module = self.remote.load_module(lib.name)
                slot["dev"] = self.remote.cpu()
                slot["vm"] = relax.VirtualMachine(module, slot["dev"])
            return slot

        loaded()

        def put(array: np.ndarray):
            return tvm.runtime.tensor(array, loaded()["dev"])

        def call(*args: Any) -> Any:
            # A remote tuple comes back as an opaque handle; the stateful interface
            # fetches its fields one by one (copied back by `numpy()` in the caller).
            vm = loaded()["vm"]
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


def cross_export(cc: str) -> Callable[[Any], str]:
    """MetaSchedule's f_export for a board: the candidate as an aarch64 shared library.

    A closure, so that cloudpickle sends it to the builder's worker processes by value."""

    def f_export(mod: Any) -> str:
        import os
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
        mod.export_library(path, cc=cc)
        return path

    return f_export


def _rpc_functions(cfg: TVMArmConfig, timeout_s: int) -> dict[str, Callable]:
    """The RPCRunner's session and argument functions (closures, sent by value to its worker).

    Sessions: straight to host:port when there is no tracker (the runner's default asks a
    tracker). Arguments: random values made here and copied over, since a runtime-only
    server (the PyPI aarch64 wheels, `TVM_USE_RUNTIME_LIB=1`) lacks the random_fill_for_measure
    that the default allocator calls on the remote."""
    host, port = cfg.host, cfg.port

    def create_session(_rpc_config: Any) -> Any:
        from tvm import rpc

        return rpc.connect(host, port, session_timeout=timeout_s)

    def alloc_argument(_session: Any, device: Any, args_info: Any, alloc_repeat: int) -> list:
        import numpy as np
        from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

        rng = np.random.default_rng(0)

        def fill(arg: Any) -> None:
            values = rng.uniform(-1.0, 1.0, size=tuple(arg.shape)).astype(str(arg.dtype))
            arg.copyfrom(values)

        return alloc_argument_common(fill, device, args_info, alloc_repeat)

    out: dict[str, Callable] = {"f_alloc_argument": alloc_argument}
    if not cfg.tracker_port:
        out["f_create_session"] = create_session
    return out


def measure(
    cfg: TVMArmConfig, emulated: bool, release: Callable[[], None] | None = None
) -> Callable[[], Any]:
    """A tuning.Measure for the board: cross-compiled candidates timed by RPCRunner.

    `release` frees the server (the executable's own session) before the search starts.
    Under an emulator one timed run per candidate is enough (the times only rank
    schedules for qemu, in a database of their own); a board gets 100 ms per repeat."""
    from plugins.backends.tvm import tuning

    check_compiler(cfg.cc)
    timeout_s = min(cfg.session_timeout_s, 120)

    @contextmanager
    def measuring() -> Iterator[tuning.Measurement]:
        from tvm.s_tir import meta_schedule as ms

        if release is not None:
            release()
        rpc_config = ms.runner.RPCConfig(
            tracker_host=cfg.host,
            tracker_port=cfg.tracker_port or cfg.port,  # unused without a tracker
            tracker_key=cfg.key,
            session_timeout_sec=timeout_s,
        )
        evaluator = ms.runner.EvaluatorConfig(
            number=1 if emulated else 3,
            repeat=1 if emulated else 3,
            min_repeat_ms=0 if emulated else 100,
            enable_cpu_cache_flush=False,
        )
        try:
            runner = ms.runner.RPCRunner(
                rpc_config, evaluator, max_workers=1, **_rpc_functions(cfg, timeout_s)
            )
        except Exception as err:
            raise HarnessError(
                f"MetaSchedule's RPC runner cannot reach the board at {cfg.host}: {err}"
            ) from err
        yield tuning.Measurement(runner, cross_export(cfg.cc))

    return measuring
