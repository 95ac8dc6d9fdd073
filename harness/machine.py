"""What machine a number was measured on: the CPU model and its vector flags.

Schedules and libraries pick kernels by vector width, so the same code is 10x apart on
an AVX2 and an AVX-512 CPU; every run and results table names both.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

VECTOR_PREFIXES = ("sse4", "avx", "fma", "amx")


@cache
def cpu() -> str:
    """E.g. "AMD EPYC 9R14 (avx, avx2, avx512f, fma, ...)"; no flags where none are readable."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):  # x86, aarch64
                flags = set(value.split())
    except OSError:
        pass
    vec = sorted(f for f in flags if f.startswith(VECTOR_PREFIXES) or f in ("asimd", "sve"))
    return f"{model} ({', '.join(vec) or 'no vector flags read'})"


def hardware() -> str:
    """The run tag: CPU, vector flags, logical CPUs this process may use, architecture."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu()} x{usable} {platform.machine()}"
