"""Random draws made inside the compiled graph (`backend.noise=philox`).

Fed from PyTorch, a sampling program's noise is drawn on one thread by a serial generator
(`torch.randn`: about 3.5 ns a number here), and drawing it was most of the call: SWAG's
8x8 MLP at batch 1 spent 1.9 ms drawing its 0.53 M numbers against 0.8 ms in TVM's
kernels. Here each draw is a kernel of its own: Philox-4x32-10 (Salmon et al., SC'11; the
generator of cuRAND and PyTorch's CUDA backend), counter-based, so every block of numbers
is computed independently, in vectors, and a draw of more than CHUNK counters (16 K
numbers) on every core; Box-Muller turns its 32-bit words into normals with polynomial
log, sin and cos (Cephes' single-precision ones), since LLVM leaves the libm calls scalar.

Draw d of a call runs Philox on the counters (i, d, s2, s3), i = 0 .. Q-1 (Q = n // 4),
under the key (s0, s1), where s is the call's int32[4] input `state` (see State), so the
program stays a pure function of its inputs. Word j of counter i becomes number j * Q + i
of the draw (uniform, Bernoulli; normals pairwise from words 0-1 and 2-3): four planes,
so the kernel writes each word with contiguous vector stores. The n - 4Q numbers left
come from counter Q.

TVM 0.27's loop vectoriser miscompiles bound variables (a `Bind` in a vectorised loop
keeps one lane), so the loops are left serial for LLVM's own vectoriser, which turns the
64-bit products into `vpmuludq` and the rest into vector code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from harness.api import Draw

ROUNDS = 10
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
WEYL = (0x9E3779B9, 0xBB67AE85)
CHUNK = 4096  # counters per parallel task: 16 K numbers, a few microseconds of work
STATE = (4,)  # key (2 words), counter's last 2 words; int32, read as uint32

_IND = " " * 12
_TWO_PI = 2.0 * math.pi
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_LOG_P = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
_SIN_P = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_P = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)


def _f(value: float) -> str:
    return f"T.float32({value!r})"


def _u(value: int) -> str:
    return f"T.uint32({value & 0xFFFFFFFF})"


def _horner(var: str, coefs: tuple[float, ...]) -> str:
    expr = _f(coefs[0])
    for c in coefs[1:]:
        expr = f"({expr} * {var} + {_f(c)})"
    return expr


def _philox(counter: str, stream: int, p: str) -> tuple[list[str], list[str]]:
    """Lines computing Philox-4x32-10 of (counter, stream, state[2], state[3]) under the
    key (state[0], state[1]), and the names of its four output words."""
    lines = [
        f"{p}k0: T.uint32 = T.Cast('uint32', state[0])",
        f"{p}k1: T.uint32 = T.Cast('uint32', state[1])",
    ]
    c = [
        counter,
        _u(stream),
        "T.Cast('uint32', state[2])",
        "T.Cast('uint32', state[3])",
    ]
    for r in range(ROUNDS):
        ka = f"({p}k0 + {_u(WEYL[0] * r)})" if r else f"{p}k0"
        kb = f"({p}k1 + {_u(WEYL[1] * r)})" if r else f"{p}k1"
        lines += [
            f"{p}a{r}: T.uint64 = T.Cast('uint64', {c[0]}) * T.uint64({MULTIPLIERS[0]})",
            f"{p}b{r}: T.uint64 = T.Cast('uint64', {c[2]}) * T.uint64({MULTIPLIERS[1]})",
        ]
        words = [
            f"T.Cast('uint32', {p}b{r} >> T.uint64(32)) ^ {c[1]} ^ {ka}",
            f"T.Cast('uint32', {p}b{r})",
            f"T.Cast('uint32', {p}a{r} >> T.uint64(32)) ^ {c[3]} ^ {kb}",
            f"T.Cast('uint32', {p}a{r})",
        ]
        lines += [f"{p}w{r}_{j}: T.uint32 = {w}" for j, w in enumerate(words)]
        c = [f"{p}w{r}_{j}" for j in range(4)]
    return lines, c


def _unit(word: str) -> str:
    """The word's top 24 bits as a float in [0, 1): exact, as torch.rand's are."""
    return f"T.Cast('float32', {word} >> T.uint32(8)) * {_f(2.0**-24)}"


def _normals(words: list[str], p: str) -> tuple[list[str], list[str]]:
    """Box-Muller on the pairs (words[0], words[1]) and (words[2], words[3])."""
    lines: list[str] = []
    out: list[str] = []
    for h in range(2):
        q = f"{p}h{h}"
        # u in (0, 1]: log(u) is finite; as a float in [2^-24, 1] it is a normal number
        lines += [
            f"{q}u: T.float32 = {_unit(words[2 * h])} + {_f(2.0**-24)}",
            # log(u) (Cephes logf): u = m 2^e with m in [sqrt(1/2), sqrt(2))
            f"{q}bits: T.uint32 = T.reinterpret('uint32', {q}u)",
            f"{q}e0: T.float32 = T.Cast('float32', T.Cast('int32', {q}bits >> T.uint32(23)) - 126)",
            f"{q}m0: T.float32 = T.reinterpret('float32', ({q}bits & T.uint32(8388607)) "
            f"| T.uint32(1056964608))",
            f"{q}lo: T.bool = {q}m0 < {_f(math.sqrt(0.5))}",
            f"{q}e: T.float32 = T.Select({q}lo, {q}e0 - {_f(1.0)}, {q}e0)",
            f"{q}x: T.float32 = T.Select({q}lo, {q}m0 + {q}m0, {q}m0) - {_f(1.0)}",
            f"{q}z: T.float32 = {q}x * {q}x",
            f"{q}y: T.float32 = {_horner(q + 'x', _LOG_P)} * {q}x * {q}z "
            f"+ {_f(_LN2_LO)} * {q}e - {_f(0.5)} * {q}z",
            f"{q}log: T.float32 = {q}x + {q}y + {_f(_LN2_HI)} * {q}e",
            f"{q}r: T.float32 = T.sqrt({_f(-2.0)} * {q}log)",
            # cos and sin of 2 pi v, v in [0, 1): v = k/4 + t, t in [-1/8, 1/8] (exact)
            f"{q}v: T.float32 = {_unit(words[2 * h + 1])}",
            f"{q}k: T.int32 = T.Cast('int32', {q}v * {_f(4.0)} + {_f(0.5)})",
            f"{q}a: T.float32 = ({q}v - T.Cast('float32', {q}k) * {_f(0.25)}) * {_f(_TWO_PI)}",
            f"{q}a2: T.float32 = {q}a * {q}a",
            f"{q}s: T.float32 = {q}a + {q}a * {q}a2 * {_horner(q + 'a2', _SIN_P)}",
            f"{q}c: T.float32 = {_f(1.0)} - {_f(0.5)} * {q}a2 "
            f"+ {q}a2 * {q}a2 * {_horner(q + 'a2', _COS_P)}",
            # rotate by k quarter turns: odd k swaps cos and sin, then the signs (selects
            # on the integer k kept LLVM from vectorising the loop)
            f"{q}odd: T.float32 = T.Cast('float32', T.bitwise_and({q}k, 1))",
            f"{q}cs: T.float32 = {_f(1.0)} - T.Cast('float32', T.bitwise_and({q}k + 1, 2))",
            f"{q}ss: T.float32 = {_f(1.0)} - T.Cast('float32', T.bitwise_and({q}k, 2))",
            f"{q}cos: T.float32 = {q}cs * ({q}c + {q}odd * ({q}s - {q}c))",
            f"{q}sin: T.float32 = {q}ss * ({q}s + {q}odd * ({q}c - {q}s))",
        ]
        out += [f"{q}r * {q}cos", f"{q}r * {q}sin"]
    return lines, out


def _values(draw: Draw, words: list[str], p: str) -> tuple[list[str], list[str]]:
    if draw.dist == "normal":
        return _normals(words, p)
    if draw.dist == "uniform":
        return [], [_unit(w) for w in words]
    keep = draw.bernoulli_p
    threshold = min(2**24, math.ceil(keep * 2**24))  # P(word >> 8 < threshold) = keep
    return [], [
        f"T.Select({w} >> T.uint32(8) < {_u(threshold)}, {_f(1.0)}, {_f(0.0)})" for w in words
    ]


def source(draw: Draw, stream: int) -> str:
    """TVMScript of the kernel that fills `draw` (stream: its index among the program's)."""
    n = math.prod(draw.shape)
    quads, tail = divmod(n, 4)
    chunks = max(1, -(-quads // CHUNK))
    shape = ", ".join(str(s) for s in draw.shape) + ("," if len(draw.shape) == 1 else "")
    lines = [
        "@T.prim_func",
        f'def main(state: T.Buffer(({STATE[0]},), "int32"), out: T.Buffer(({shape}), "float32")):',
        '    T.func_attr({"tirx.noalias": True})',
        f'    flat = T.decl_buffer(({n},), "float32", data=out.data)',
    ]
    if quads:
        loop = "T.parallel" if chunks > 1 else "T.serial"
        lines += [
            f"    for chunk in {loop}({chunks}):",
            f"        for i in T.serial(chunk * {CHUNK}, "
            f"T.min(chunk * {CHUNK} + {CHUNK}, {quads})):",
        ]
        bits, words = _philox("T.Cast('uint32', i)", stream, "")
        more, values = _values(draw, words, "")
        lines += [_IND + line for line in bits + more]
        lines += [_IND + f"flat[{j * quads} + i] = {v}" for j, v in enumerate(values)]
    if tail:
        bits, words = _philox(_u(quads), stream, "t")
        more, values = _values(draw, words, "t")
        lines += ["    " + line for line in bits + more]
        lines += [f"    flat[{4 * quads + j}] = {values[j]}" for j in range(tail)]
    return "\n".join(lines)


def kernel(draw: Draw, stream: int) -> Any:
    """The PrimFunc of `source`, marked scheduled: its loops are final as written."""
    import tvm

    func = tvm.script.from_source(source(draw, stream))
    return func.with_attr("tirx.is_scheduled", True)


def in_graph(mod: Any, draws: list[Draw]) -> Any:
    """`mod` with its draw inputs made inside: main(x, *noise) becomes main(x, state), each
    draw a call of its kernel at the top of the function, in a block of its own (outside
    the dataflow FuseOps fuses: a draw kernel is opaque to it)."""
    from tvm import relax

    main = mod["main"]
    x, *noise = main.params
    if len(noise) != len(draws):
        raise ValueError(f"main takes {len(noise)} noise inputs for {len(draws)} draws")
    state = relax.Var("state", relax.TensorType(list(STATE), "int32"))
    builder = relax.BlockBuilder(mod)
    bindings = []
    for i, (var, draw) in enumerate(zip(noise, draws, strict=True)):
        name = f"draw{i}_{draw.dist.split('(')[0]}"
        gv = builder.add_func(kernel(draw, i).with_attr("global_symbol", name), name)
        out = relax.TensorType(list(draw.shape), "float32")
        bindings.append(relax.VarBinding(var, relax.call_tir(gv, relax.Tuple([state]), out)))
    body = relax.SeqExpr([relax.BindingBlock(bindings), *main.body.blocks], main.body.body)
    func = relax.Function([x, state], body, main.ret_ty, main.is_pure, main.attrs)
    if func.attrs and "num_input" in func.attrs:
        func = func.with_attr("num_input", 2)
    builder.update_func(mod.get_global_var("main"), func)
    return relax.transform.Normalize()(builder.get())


class State:
    """The `state` input, fresh per call: the feed of an executable built with its draws
    inside. All four words are drawn from PyTorch's generator at every call (0.7 us), 31
    random bits each, so `torch.manual_seed` fixes the next calls' numbers as it fixes
    torch's own draws, and two executables (this host's, a board's) called after the same
    seed draw the same numbers whatever each was called for before (a call counter would
    differ: building one times its calls). 124 random bits a call make a repeated state
    as unlikely as a repeated seed."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self) -> list[Tensor]:
        # a new 16-byte tensor per call: a state kept by one caller never changes under it
        state = torch.empty(STATE, dtype=torch.int32)
        return [state.random_(generator=self.generator)]
