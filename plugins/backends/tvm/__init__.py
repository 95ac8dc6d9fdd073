"""Apache TVM backends: `tvm` (this CPU) and `tvm_arm` (64-bit ARM boards over RPC).

TVM is imported only when a program is compiled, so listing plugins or running other
backends does not pay for loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

from harness.api import ConfigSchema

hookimpl = pluggy.HookimplMarker("bnn_harness")


@dataclass
class TVMConfig:
    name: str = "tvm"
    tune: str = "default"  # none | default | metaschedule
    trials: int = 64  # MetaSchedule's budget per build, shared by the workloads it tunes
    tuning_dir: str = "results/tvm_tuning"  # database root; one database per target inside
    path: str = "auto"  # auto | gaussian | generic (auto: Gaussian library when possible)
    mcpu: str = ""  # empty: LLVM's name for this host's CPU
    # TVM's thread pool size; 0: every core this process may run on (TVM's own default
    # is half the logical CPUs on x86, one thread on a 2-core machine), or one thread at a
    # batch size where one measured faster when it was built (describe: threads_by_batch)
    threads: int = 0
    # a sampling program's random draws: philox, drawn inside the compiled module
    # (Philox-4x32-10, a draw of over 16 K numbers on TVM's threads); torch, sampled by
    # PyTorch per call and fed in (the numbers eager PyTorch would draw under one seed)
    noise: str = "philox"


@dataclass
class TVMArmConfig(TVMConfig):
    name: str = "tvm_arm"
    mcpu: str = ""  # e.g. cortex-a72 (Raspberry Pi 4); empty: generic ARMv8-A + NEON
    cores: int = 4  # the board's cores (MetaSchedule sizes parallel loops by it)
    cc: str = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu
    # RPC: through a tracker (key picks the board kind) or, with tracker_port 0, straight
    # to a server at host:port.
    host: str = "127.0.0.1"
    port: int = 9090
    tracker_port: int = 0
    key: str = "rasp4b"
    session_timeout_s: int = 600
    # true when the server is an emulator (qemu-user): results are tagged as emulated,
    # since those latencies are not ARM latencies
    emulated: bool = False


@hookimpl
def bnn_harness_backends() -> list:
    from plugins.backends.tvm.backend import TVMArmBackend, TVMBackend

    return [TVMBackend(), TVMArmBackend()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [
        ConfigSchema("backend", "tvm_schema", TVMConfig),
        ConfigSchema("backend", "tvm_arm_schema", TVMArmConfig),
    ]
