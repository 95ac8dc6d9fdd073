"""Hand-written CPU schedules for the Gaussian operators (how, kept apart from what).

The rule per block is picked by the compute's name from gaussian_ops.py:

- `*_moments` (dense, conv): output tile of `lanes` outputs on the innermost axis,
  accumulated in registers (cache_write to local) with the reduction loops outside the
  vector lanes; dense also blocks ROW_BLOCK batch rows inside the reduction, so each
  weight vector loaded serves several rows, and conv blocks ROW_BLOCK output rows the
  same way (LeNet's first PFP conv at batch 100: 2.5 ms with one row, two accumulators
  and the FMA latency exposed; 1.3 ms with four); the bias epilogue runs on the same
  tile; the batch/channel loop is parallel.
- pads and pool window copies: inlined into their consumer.
- everything else (ReLU, Clark folds, batch-norm, flatten): the fewest trailing axes
  that hold whole vectors fused and vectorised by `lanes`, parallel over the rest.

Static shapes only (lowering.py builds one module per batch size), so every split is
by a factor that divides its loop: no tail predicates that would block vectorisation.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir, tirx

INLINE = ("pool_m0", "pool_v0", "zero_var")
ROW_BLOCK = 4  # batch rows per register tile: 4 rows x 2 accumulators x lanes fit the registers
# a plain matmul/conv (one accumulator): up to 10 rows. 8 was measured best of 2-20 on
# lane-divisible shapes, where 8 to 16 rows tie; but 8 does not divide a batch of 100,
# which then got blocks of 5 rows, too few chains to hide the FMA latency (SWAG's packed
# first layer, [100, 784] @ [784, 3000]: 64 GFLOP/s with 5 rows, 84 with 10).
PLAIN_ROW_BLOCK = 10
BIAS = ("bias_m", "bias_v")


def _divisor(extent: int, cap: int) -> int:
    """The largest divisor of extent not above cap (a split without a tail)."""
    for f in range(min(cap, extent), 0, -1):
        if extent % f == 0:
            return f
    return 1


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _extent_of(sch: s_tir.Schedule, loops: list) -> int:
    out = 1
    for loop in loops:
        out *= _extent(sch, loop)
    return out


def reduces(sch: s_tir.Schedule, block) -> bool:
    """Whether the block has a reduction axis (a matmul, conv or pooling window)."""
    return any(it.iter_type != 0 for it in sch.get(block).iter_vars)


def _elementwise(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if reduces(sch, block):  # pooling windows: parallel, window inner
        spatial = [lp for lp, it in zip(loops, iters, strict=True) if it.iter_type == 0]
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
        return
    # The vector runs over the fewest trailing axes whose extent is whole vectors: split
    # out of all axes fused, its lanes' indices nest three divisions deep on a 4-D
    # buffer, which the simplifier could not fold back to one contiguous load, and each
    # lane was gathered alone (LeNet's first ReLU as [100, 6, 24, 24]: 2.6 ms; over the
    # last two axes, 576 = 36 x 16, a plain vector load).
    tail = len(loops) - 1
    while tail > 0 and _extent_of(sch, loops[tail:]) % lanes:
        tail -= 1
    last = _extent(sch, loops[-1])
    if _extent_of(sch, loops[tail:]) % lanes and last > lanes:
        _whole_vectors_then_rest(sch, loops, lanes)
        return
    head = loops[:tail]
    fused = sch.fuse(*loops[tail:]) if len(loops) - tail > 1 else loops[tail]
    total = _extent(sch, fused)
    vec = _divisor(total, lanes)
    outer, inner = sch.split(fused, [None, vec])
    sch.parallel(sch.fuse(*head, outer) if head else outer)
    if vec > 1:
        sch.vectorize(inner)


def _whole_vectors_then_rest(sch: s_tir.Schedule, loops: list, lanes: int) -> None:
    """Rows whose width is no multiple of the lanes (SWAG's weight draw: 30 x 17,610): each
    row as whole vectors, then one short vector for the rest. Fused and split by a divisor
    (15) instead, every lane's index was divided and reduced by the row width: SWAG's
    weight-draw kernel (low-rank matmul and this epilogue) at batch 1 of its 8x8 MLP took
    1.60 ms that way, 1.52 ms this way (one thread, interleaved)."""
    *lead, last = loops
    width = _extent(sch, last)
    body, rest = sch.loop_partition(last, [width - width % lanes, None])
    vectors, lane = sch.split(body, [None, lanes])
    sch.vectorize(lane)
    sch.vectorize(rest)
    if _extent_of(sch, lead) > 1:
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    else:  # one row (1-D, or a batch of 1): its vectors in parallel
        sch.parallel(vectors)


def inline_epilogues(sch: Any, epilogues: list) -> None:
    """Every block after a reduction folded into its output tile's write-back: a block
    fed by the reduction is inlined into its producer, one that is not (a mask computed
    from another input, as the linearised ReLU's `greater`) into its consumer first.
    Raises (a ScheduleError) when some block fits neither way."""
    todo = list(epilogues)
    while todo:
        left = []
        for block in todo:
            try:
                sch.reverse_compute_inline(block)
            except s_tir.ScheduleError:
                try:
                    sch.compute_inline(block)
                except s_tir.ScheduleError:
                    left.append(block)
        if len(left) == len(todo):
            raise s_tir.ScheduleError("an epilogue block cannot be inlined")
        todo = left


def _reduction(
    sch: s_tir.Schedule, block, lanes: int, epilogues: list, all_rows: bool = False
) -> None:
    """Loops (spatial..., last spatial, reductions...) -> (parallel, tile, red..., lanes).

    all_rows: block the second-to-last spatial axis whatever the rank (batched matmul, conv
    rows), not only for a 2-D dense, and with a single accumulator per output twice as
    many rows (PLAIN_ROW_BLOCK). The tile is one vector register at most: wider tiles
    (two or three registers per row) measured 2-4x slower, LLVM spilling them."""
    acc = [sch.cache_write(block, i, "local") for i in range(len(sch.get(block).writes))]
    if all_rows:
        inline_epilogues(sch, epilogues)
    else:
        for epi in epilogues:
            sch.reverse_compute_inline(epi)
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    spatial = [lp for lp, it in zip(loops, iters, strict=True) if it.iter_type == 0]
    reduce = [lp for lp, it in zip(loops, iters, strict=True) if it.iter_type != 0]
    last = spatial[-1]
    n_cols = _extent(sch, last)
    n_rows = _extent(sch, spatial[-2]) if len(spatial) > 1 else 1
    tile, lane = sch.split(last, [None, _divisor(n_cols, lanes)])
    lead, rows = spatial[:-1], []
    if lead and (len(lead) == 1 or all_rows):  # a block of rows shares every weight load
        per_tile = PLAIN_ROW_BLOCK if len(acc) == 1 else ROW_BLOCK
        block_rows = _divisor(_extent(sch, lead[-1]), per_tile)
        if block_rows > 1:
            lead_out, row = sch.split(lead[-1], [None, block_rows])
            lead, rows = [*lead[:-1], lead_out], [row]
    # The larger operand is read once: with more columns than rows (SVI's packed first
    # layer, [100, 784] @ [784, 10000]) the row blocks run innermost, so each tile's
    # weight panel stays in cache while every row block passes over it (tiles inside
    # row blocks read the 31 MB weight 13 times); with more rows, tiles innermost.
    wide = bool(rows) and n_cols > n_rows
    outer_loops = [*lead[:-1], tile, lead[-1]] if wide else [*lead, tile]
    sch.reorder(*outer_loops, *reduce, *rows, lane)
    outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else tile
    for stage in acc:
        sch.reverse_compute_at(stage, outer)
    # parallel/vectorize before decompose_reduction: afterwards the update block is no
    # longer a reduction block and both primitives refuse the loop
    sch.parallel(outer)
    sch.vectorize(lane)
    for row in rows:
        sch.unroll(row)
    init = sch.decompose_reduction(block, reduce[0])
    for stage in [init, *acc]:
        sch.vectorize(sch.get_loops(stage)[-1])


PIXEL_BLOCK = 4  # output pixels per channel-vector tile of moments (2 accumulators each)


def _conv_channels(sch: s_tir.Schedule, block, lanes: int, epilogues: list) -> None:
    """Conv moments with a vector of output channels as the tile (weights [in, kh, kw,
    out]: one load per tap) and PIXEL_BLOCK pixels of a row sharing it; each input value
    is a broadcast. LeNet's second conv has 8-wide rows: as row tiles its vectors were
    half empty and the FMAs waited on their latency (4.2 ms at batch 100)."""
    acc = [sch.cache_write(block, i, "local") for i in range(len(sch.get(block).writes))]
    inline_epilogues(sch, epilogues)
    b, o, y, x, *reduce = sch.get_loops(block)
    o_out, o_in = sch.split(o, [None, lanes])
    pixels = PIXEL_BLOCK * 2 // len(acc)  # a plain conv has one accumulator per pixel
    x_out, x_in = sch.split(x, [None, _divisor(_extent(sch, x), pixels)])
    sch.reorder(b, y, x_out, o_out, *reduce, x_in, o_in)
    outer = sch.fuse(b, y, x_out, o_out)
    for stage in acc:
        sch.reverse_compute_at(stage, outer)
    sch.parallel(outer)
    sch.vectorize(o_in)
    sch.unroll(x_in)
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    for stage in acc:
        sch.vectorize(sch.get_loops(stage)[-1])


def channel_tiles_fit(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """Whether _conv_channels applies: an NCHW conv (four spatial axes, three reduction
    axes) whose output channels are whole vectors."""
    iters = sch.get(block).iter_vars
    kinds = [it.iter_type != 0 for it in iters]
    return kinds == [False] * 4 + [True] * 3 and int(iters[1].dom.extent) % lanes == 0


def _channel_tiled(sch: s_tir.Schedule, name: str, block, lanes: int) -> bool:
    """Conv moments whose output channels are whole vectors get _conv_channels."""
    is_conv = name.startswith("conv") and name.endswith("_moments")
    return is_conv and channel_tiles_fit(sch, block, lanes)


def schedule_func(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    channels = any(_channel_tiled(sch, n, b, lanes) for n, b in blocks.items())
    # conv_sq feeds broadcasts to the channel tiles; row tiles square their input vector
    # in the loop instead (a vector load of it measured slower: 1.6 against 1.3 ms for
    # LeNet's first conv at batch 100)
    inline = INLINE if channels else (*INLINE, "conv_sq")
    for name, block in blocks.items():
        if name.startswith(inline):
            sch.compute_inline(block)
    epilogues = [blocks[n] for n in BIAS if n in blocks]
    for name, block in blocks.items():
        if name.startswith(inline) or name in BIAS:
            continue
        if _channel_tiled(sch, name, block, lanes):
            _conv_channels(sch, block, lanes, epilogues)
        elif name.endswith("_moments"):
            _reduction(sch, block, lanes, epilogues, all_rows=name.startswith("conv"))
        else:
            _elementwise(sch, block, lanes)
    return sch.mod["main"]


def schedule_module(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every TIR function of the module scheduled; the Relax function left as it is."""
    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            func = schedule_func(func, lanes).with_attr("global_symbol", gv.name_hint)
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs)
