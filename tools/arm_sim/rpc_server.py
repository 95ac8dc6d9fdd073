"""A TVM RPC server that serves sessions in-process: `python rpc_server.py HOST PORT [TRACKER KEY]`.

Why not `python -m tvm.exec.rpc_server`: under qemu-user it starts a fresh Python, and the
x86 kernel cannot exec an aarch64 binary without binfmt_misc (`Exec format error`). This
server only forks, which qemu handles. On a real board either server works; this one needs
nothing but the runtime wheels (apache-tvm, apache-tvm-ffi, numpy, ml_dtypes,
typing_extensions) and is started the same way on both.
One session at a time: clients connect one after the other.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # no compiler library on the device
    from tvm.rpc.server import PopenRPCServerState

    host = argv[0] if argv else "127.0.0.1"
    port = int(argv[1]) if len(argv) > 1 else 9090
    tracker = None
    key = ""
    if len(argv) > 3:  # register with a tracker: TRACKER=host:port KEY=e.g. rasp4b
        t_host, t_port = argv[2].rsplit(":", 1)
        tracker, key = (t_host, int(t_port)), argv[3]
    kind = os.environ.get("BNN_DEVICE_KIND", "")
    if kind:  # "emulated" under arm-sim: the harness asks, and tags its runs with it
        import tvm_ffi

        tvm_ffi.register_global_func("bnn_harness.device_kind", lambda: kind)
    state = PopenRPCServerState(host, port, port + 1, tracker_addr=tracker, key=key)
    print(f"rpc server listening on {host}:{state.port}", flush=True)
    state.thread.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
