"""Process-wide state a job may change, put back when the job ends.

Jobs of a sweep share one process (Hydra's basic launcher, a joblib worker), and a
backend may set PyTorch's thread count or an environment variable for its own
executables; without this, the next job, and its reference timing, would inherit them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Read by OpenMP, MKL and TVM's runtime when their thread pools start: logged with the
# timings because they decide how many cores a measured call may use.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS")


@dataclass(frozen=True)
class ThreadSettings:
    torch_threads: int
    interop_threads: int
    env: tuple[tuple[str, str], ...]

    @classmethod
    def current(cls) -> ThreadSettings:
        env = tuple((k, os.environ[k]) for k in THREAD_ENV if k in os.environ)
        return cls(torch.get_num_threads(), torch.get_num_interop_threads(), env)

    def apply(self) -> None:
        """Intra-op threads only: PyTorch fixes inter-op threads once work has started."""
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def params(self) -> dict[str, str]:
        env = {f"timing.env.{k}": v for k, v in self.env}
        return {
            "timing.torch_threads": str(self.torch_threads),
            "timing.torch_interop_threads": str(self.interop_threads),
        } | env


def restore_environ(saved: dict[str, str]) -> None:
    """Put os.environ back to `saved`, touching only the keys that differ."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@contextmanager
def job_state() -> Iterator[ThreadSettings]:
    """Runs one job; afterwards the thread count and the environment are as before it."""
    environ = dict(os.environ)
    threads = ThreadSettings.current()
    try:
        yield threads
    finally:
        restore_environ(environ)
        threads.apply()
