"""Philox-4x32-10 in numpy, as Random123 defines it, and the numbers the TVM backend's
draw kernels make: the reference the in-graph draws are tested against."""

from __future__ import annotations

import numpy as np
import torch

from harness.api import Draw

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
WEYL = (0x9E3779B9, 0xBB67AE85)
MASK = np.uint64(0xFFFFFFFF)

# Random123's known-answer tests (kat_vectors, philox4x32 10 rounds): counter, key, result
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF,) * 2,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def philox(counter, key, rounds: int = 10) -> np.ndarray:
    """[4, n] uint32 words of the counters (each part broadcast to n) under key."""
    c = [np.atleast_1d(np.asarray(v, dtype=np.uint64)) for v in counter]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(rounds):
        p0, p1 = c[0] * np.uint64(MULTIPLIERS[0]), c[2] * np.uint64(MULTIPLIERS[1])
        c = [
            ((p1 >> np.uint64(32)) ^ c[1] ^ k0) & MASK,
            p1 & MASK,
            ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & MASK,
            p0 & MASK,
        ]
        k0, k1 = (k0 + np.uint64(WEYL[0])) & MASK, (k1 + np.uint64(WEYL[1])) & MASK
    return np.stack(np.broadcast_arrays(*c)).astype(np.uint32)


def _counters(n: int, stream: int, state: np.ndarray) -> np.ndarray:
    """[4, n // 4 + 1] words of draw `stream` at `state` (int32[4]): counters 0 .. n // 4."""
    s = np.asarray(state, dtype=np.int32).view(np.uint32).astype(np.uint64)
    quads = n // 4
    return philox((np.arange(quads + 1, dtype=np.uint64), stream, s[2], s[3]), (s[0], s[1]))


def _in_draw_order(planes: np.ndarray, n: int) -> np.ndarray:
    """Word j of counter i at j * (n // 4) + i, then the tail's from counter n // 4."""
    quads = n // 4
    return np.concatenate([planes[:, :quads].reshape(-1), planes[:, quads][: n - 4 * quads]])


def words(n: int, stream: int, state: np.ndarray) -> np.ndarray:
    """The n words of draw `stream` at `state`, in the draw's order."""
    return _in_draw_order(_counters(n, stream, state), n)


def normals(n: int, stream: int, state: np.ndarray) -> np.ndarray:
    """Box-Muller in float64 on the same words: what the float32 kernel approximates."""
    w = _counters(n, stream, state)
    out = []
    for h in range(2):
        u = ((w[2 * h] >> 8).astype(np.float64) + 1) * 2.0**-24
        v = (w[2 * h + 1] >> 8).astype(np.float64) * 2.0**-24
        r = np.sqrt(-2 * np.log(u))
        out += [r * np.cos(2 * np.pi * v), r * np.sin(2 * np.pi * v)]
    return _in_draw_order(np.stack(out), n)


def kernel_numbers(draws: list[Draw], state: torch.Tensor) -> list[torch.Tensor]:
    """What each draw's kernel, built alone, makes at `state`."""
    import tvm

    from plugins.backends.tvm import philox as kernels
    from plugins.backends.tvm.backend import host_target

    st = tvm.runtime.tensor(np.asarray(state, dtype=np.int32))
    out = []
    for i, d in enumerate(draws):
        lib = tvm.compile(tvm.IRModule({"main": kernels.kernel(d, i)}), target=host_target())
        buf = tvm.runtime.tensor(np.zeros(d.shape, np.float32))
        lib["main"](st, buf)
        out.append(torch.from_numpy(buf.numpy()))
    return out
