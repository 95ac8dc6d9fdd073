"""Any InferenceProgram on TVM: torch.export, the Relax frontend, then the same build as PFP.

Random draws are the catch. TVM's PyTorch frontend turns `randn`/`randn_like` into
constants frozen at import time and drops dropout, so a sampling program would run with
the same "random" numbers on every call (MC dropout: with no dropout at all). So the
program's declared draws (`InferenceProgram.draws`: weight noise, dropout keep masks)
become inputs of the exported graph through the API's shared helper (`with_draws`), and
each call of the executable samples them fresh with PyTorch (`sample_draws`) and feeds
them in. That sampling runs inside the executable's call, so its cost is in every
timing; everything downstream of the noise (reparameterisation, local
reparameterisation, masks, the S forward passes) is compiled by TVM.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from harness.api import Draw, HarnessError, InferenceProgram, sample_draws, with_draws


def to_relax(program: InferenceProgram, x: Tensor) -> tuple[Any, list[Draw]]:
    """The Relax module of `program` at x's (static) shape, and the draws it takes as inputs."""
    from tvm.relax.frontend.torch import from_exported_program

    module, draws = with_draws(program, x)
    noise = tuple(sample_draws(draws))
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (x, *noise))
        mod = from_exported_program(
            exported, unwrap_unit_return_tuple=True, custom_convert_map=CONVERTERS
        )
    except HarnessError:
        raise
    except Exception as err:  # the frontend's own errors name the unsupported operator
        raise HarnessError(
            f"TVM's PyTorch frontend cannot import this program: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return mod, draws


def _as_pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _max_pool2d_with_indices(node: Any, importer: Any) -> Any:
    """Max pooling with torch's indices (flat, per channel, int64; the first maximum of a
    window in row-major order wins, as in torch's CPU kernel).

    TVM 0.27's own converter returns `zeros_like(output)` for the indices: float32 zeros,
    which made the linearised LeNet (it gathers the variance at the argmax) fail to import
    with "GatherElements requires int64 indices", and would read element 0 of every
    channel if cast. The window is unrolled (kernels are 2x2 or 3x3), so no reduction."""
    from tvm import te, tirx

    args = importer.retrieve_args(node)
    x = args[0]
    kernel = _as_pair(args[1])
    stride = _as_pair(args[2] if len(args) > 2 and args[2] else kernel)
    pad = _as_pair(args[3] if len(args) > 3 else 0)
    dilation = _as_pair(args[4] if len(args) > 4 else 1)
    ceil = bool(args[5]) if len(args) > 5 else False
    n, c, h, w = (int(d) for d in x.ty.shape)

    def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
        span = size + 2 * p - d * (k - 1) - 1
        out = -(-span // s) + 1 if ceil else span // s + 1
        return out - 1 if ceil and (out - 1) * s >= size + p else out  # torch's rule

    oh = out_size(h, kernel[0], stride[0], pad[0], dilation[0])
    ow = out_size(w, kernel[1], stride[1], pad[1], dilation[1])

    def te_fn(data: Any) -> list:
        lowest = tirx.min_value(data.dtype)

        def at(b, ch, y, z, dy, dx):
            iy = y * stride[0] - pad[0] + dy * dilation[0]
            ix = z * stride[1] - pad[1] + dx * dilation[1]
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
            value = tirx.if_then_else(inside, data[b, ch, iy, ix], lowest)
            return value, (iy * w + ix).astype("int64")

        def window(b, ch, y, z):
            best, index = at(b, ch, y, z, 0, 0)
            for dy in range(kernel[0]):
                for dx in range(kernel[1]):
                    if dy or dx:
                        value, where = at(b, ch, y, z, dy, dx)
                        index = tirx.Select(value > best, where, index)
                        best = te.max(best, value)
            return [best, index]

        return list(te.compute((n, c, oh, ow), window, name="max_pool2d_with_indices"))

    return importer.block_builder.emit_te(te_fn, x, primfunc_name_hint="max_pool2d_indices")


def _amax(node: Any, importer: Any) -> Any:
    """torch.amax (the per-slice scale of fake_quant in quantized programs): TVM 0.27's
    frontend has no converter for it. An empty `dim` reduces every axis, as in torch."""
    from tvm import relax

    args = importer.retrieve_args(node)
    dims = args[1] if len(args) > 1 else []
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = bool(args[2]) if len(args) > 2 else False
    return importer.block_builder.emit(relax.op.max(args[0], axis=dims or None, keepdims=keep))


# aten ops whose TVM 0.27 converter is wrong or missing for our programs
CONVERTERS = {
    "max_pool2d_with_indices.default": _max_pool2d_with_indices,
    "amax.default": _amax,
}


def _static_shape(expr: Any) -> list[int] | None:
    """A Relax value's shape as ints, or None when it has none or it is symbolic."""
    shape = getattr(expr.ty, "shape", None)
    try:
        return [int(d) for d in shape] if shape is not None else None
    except (TypeError, AttributeError):
        return None


def _rewrite(mod: Any, mutator: Any) -> Any:
    """Every Relax function of mod through a PyExprMutator class, dead code dropped."""
    import tvm
    from tvm import relax

    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = mutator(mod).visit_expr(func)
        out[gv] = func
    return relax.transform.DeadCodeElimination()(tvm.IRModule(out, attrs=mod.attrs))


def _wasteful(n: int, lanes: int) -> bool:
    """Whether an output width of n is not a whole number of vectors. Tiles of a divisor
    under the lane count (10 of 16 for a 100-wide layer, 15 for SWAG's 89,610-wide weight
    draw) become masked or split vectors; padded, SWAG's low-rank draw runs in 16-lane
    tiles even with its epilogue (the slice back) folded into the tile: 25.9 against
    26.7 ms a call at batch 100, interleaved. A width under one vector is one (partial)
    vector per row either way."""
    return n > lanes and n % lanes != 0


def pad_widths(mod: Any, lanes: int) -> Any:
    """Constant matmul weights zero-padded to a multiple of the lane count on their output
    axis, the padding carried through bias adds, ReLUs and broadcasts, and folded into the
    next matmul as zero weight rows; a slice back to the true width feeds anything else.

    As in the Gaussian library (lowering.py): a 100-wide layer otherwise runs as 10-lane
    tiles, which an AVX-512 CPU executes as masked half-empty vectors (the first MLP
    matmul at batch 100: 0.33 ms as 10-lane tiles, 0.21 ms as 16-lane ones here).
    Padded units hold exact zeros (zero weights, zero bias, relu(0)), so the zero rows
    they meet in the next matmul add nothing. Weights computed per call (SVI's sampled
    weights) are not constants and keep their width."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    mod = relax.transform.FoldConstant()(mod)  # transposed weights become constants

    width = _static_shape

    def pad_const(c: Any, axis: int, to: int) -> Any:
        data = c.value.numpy()
        pads = [(0, 0)] * data.ndim
        pads[axis] = (0, to - data.shape[axis])
        return relax.const(np.pad(data, pads))

    @relax.expr_functor.mutator
    class _Pad(relax.PyExprMutator):
        def __init__(self, mod: Any):
            super().__init__(mod)
            self.wide: list[Any] = []  # the padded vars this pass made

        def _wide(self, arg: Any) -> tuple[Any, int] | None:
            """(padded var, true width) when arg is our slice of a padded var."""
            if not isinstance(arg, relax.Var):
                return None
            value = self.lookup_binding(arg)
            if not isinstance(value, relax.Call) or value.op.name != "relax.strided_slice":
                return None
            src = value.args[0]
            if not any(src.same_as(w) for w in self.wide):
                return None
            return src, width(arg)[-1]

        def _slice(self, padded: Any, n: int) -> Any:
            var = self.builder_.emit(padded)
            self.wide.append(var)
            return relax.op.strided_slice(var, axes=[len(width(var)) - 1], begin=[0], end=[n])

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
            if name == "relax.matmul":
                return self._matmul(call)
            if name in ("relax.nn.relu", "relax.broadcast_to", "relax.add"):
                return self._carry(call, name)
            return call

        def _matmul(self, call: Any) -> Any:
            a, w = call.args
            shape = width(w)
            if not isinstance(w, Constant) or shape is None or len(shape) < 2:
                return call
            n = shape[-1]
            wide = self._wide(a)
            if wide is not None and wide[1] == shape[-2]:  # zero rows for the padded inputs
                a = wide[0]
                w = pad_const(w, -2, width(a)[-1])
            padded = -(-n // lanes) * lanes
            if _wasteful(n, lanes):
                w = pad_const(w, -1, padded)
                return self._slice(relax.op.matmul(a, w, out_dtype=call.attrs.out_dtype), n)
            return call if a.same_as(call.args[0]) else relax.op.matmul(a, w, call.attrs.out_dtype)

        def _carry(self, call: Any, name: str) -> Any:
            """An elementwise op on a padded value runs padded (the slice moves after it)."""
            if name == "relax.add":
                x, c = call.args
                if isinstance(x, Constant):
                    x, c = c, x
                wide = self._wide(x)
                if wide is None or not isinstance(c, Constant):
                    return call
                cshape = width(c)
                if cshape and cshape[-1] == wide[1]:
                    c = pad_const(c, -1, width(wide[0])[-1])
                elif cshape and cshape[-1] != 1:
                    return call
                return self._slice(relax.op.add(wide[0], c), wide[1])
            wide = self._wide(call.args[0])
            if wide is None:
                return call
            if name == "relax.nn.relu":
                return self._slice(relax.op.nn.relu(wide[0]), wide[1])
            target = width(call)
            if target is None or target[-1] != wide[1]:
                return call
            shape = [*target[:-1], width(wide[0])[-1]]
            return self._slice(relax.op.broadcast_to(wide[0], shape), wide[1])

    return _rewrite(mod, _Pad)


def shared_input_matmuls(mod: Any, lanes: int) -> Any:
    """A batched matmul whose first operand is one matrix broadcast over the sample axis
    (the first layer of every weight-sampling program: the same x against S sampled
    weights) becomes one matmul over all samples, reshaped back to [S, B, N].

    torch.export writes it as broadcast_to(x, [S, B, K]) @ w[S, K, N]: a copy of x per
    sample (31 MB for SVI's MLP at batch 100) and S matmuls of N = 100 outputs, which run
    as 10-lane tiles. When w is the transpose of the weights as sampled ([S, N, K], as
    torch's linear writes it), the product is taken transposed, W [S*N, K] @ x.T [K, B]
    (x.T zero-padded to whole vectors), so the sampled weights are read as they lie:
    packing them cost a transposing copy of 7.8 M values (14 ms for SVI's MLP) on every
    call. Otherwise x [B, K] @ W [K, S*N], W packed by the op that computes it.
    """
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    @relax.expr_functor.mutator
    class _Shared(relax.PyExprMutator):
        def _bound(self, arg: Any, op: str) -> Any | None:
            """The call of `op` that arg is bound to, or None."""
            value = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
            ok = isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
            return value if ok and value.op.name == op else None

        def _source(self, arg: Any, op: str) -> Any | None:
            """The operand of `op` that arg is bound to, or None."""
            call = self._bound(arg, op)
            return None if call is None else call.args[0]

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
                return call
            a, w = call.args
            x = self._source(a, "relax.broadcast_to")
            ws, xs = _static_shape(w), _static_shape(x) if x is not None else None
            if xs is None or ws is None or len(xs) != 2 or len(ws) != 3:
                return call
            same = self._source(w, "relax.broadcast_to")  # a no-op broadcast of w itself
            if same is not None and _static_shape(same) == ws:
                w = same
            s, k, n = ws
            b = xs[0]
            if xs[1] != k or _static_shape(call) != [s, b, n]:
                return call
            dtype = call.attrs.out_dtype
            natural = self._transposed(w)
            if natural is not None:  # w[s] = natural[s].T: y.T = natural [S*N, K] @ x.T
                rows = relax.op.reshape(natural, [s * n, k])
                cols = relax.op.permute_dims(x, [1, 0])
                wide = -(-b // lanes) * lanes if _wasteful(b, lanes) else b
                if wide != b:  # zero columns: whole-vector tiles over the batch
                    cols = relax.op.nn.pad(cols, [0, 0, 0, wide - b])
                out = self.builder_.emit(relax.op.matmul(rows, cols, out_dtype=dtype))
                if wide != b:
                    out = self.builder_.emit(
                        relax.op.strided_slice(out, axes=[1], begin=[0], end=[b])
                    )
                out = self.builder_.emit(relax.op.reshape(out, [s, n, b]))
                return relax.op.permute_dims(out, [0, 2, 1])
            packed = relax.op.reshape(relax.op.permute_dims(w, [1, 0, 2]), [k, s * n])
            out = self.builder_.emit(relax.op.matmul(x, packed, out_dtype=dtype))
            out = self.builder_.emit(relax.op.reshape(out, [b, s, n]))
            return relax.op.permute_dims(out, [1, 0, 2])

        def _transposed(self, w: Any) -> Any | None:
            """The [S, N, K] tensor that w ([S, K, N]) transposes, if it is one (the
            weights as sampled, rows of K contiguous): then no packing copy is needed."""
            call = self._bound(w, "relax.permute_dims")
            axes = None if call is None else call.attrs.axes
            if axes is None or [int(a) for a in axes] != [0, 2, 1]:
                return None
            src = call.args[0]
            if isinstance(src, Constant):
                return None  # constant weights (an ensemble's) are packed once, at build
            return src

    return _rewrite(mod, _Shared)


def _written_shape(sch: Any, block: Any) -> list[int] | None:
    writes = sch.get(block).writes
    return [int(d) for d in writes[0].source.shape] if len(writes) == 1 else None


def _conv_weights(sch: Any, block: Any, lanes: int) -> int | None:
    """The read index of an NCHW conv's OIHW weights when its output channels are whole
    vectors (the channel-tiled schedule applies), else None."""
    from plugins.backends.tvm import schedules

    if not schedules.channel_tiles_fit(sch, block, lanes):
        return None
    iters = sch.get(block).iter_vars
    for i, read in enumerate(sch.get(block).reads):
        first = read.region[0].min if len(read.region) == 4 else None
        if first is not None and first.same_as(iters[1].var):
            return i
    return None


def schedule_func(func: Any, lanes: int) -> Any | None:
    """A fused PrimFunc built around one matmul/conv (`FuseOps` output: injective
    producers, the reduction, elementwise epilogues) with the Gaussian library's dense
    schedule: register tile of whole vectors on the output's last axis, a block of rows
    sharing each weight load, the epilogue (bias, ReLU, broadcast) applied in the tile
    before the write-back. None when the function is not of that shape: DLight gets it.

    DLight's CPU rules (GEMV, Reduction) give a matmul one dot product per output, no
    register tiling: about 1.4 GFLOP/s, slower than eager PyTorch at every batch size."""
    from tvm import s_tir

    from plugins.backends.tvm import schedules

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [i for i, b in enumerate(blocks) if schedules.reduces(sch, b)]
    if len(reductions) != 1:
        return None
    at = reductions[0]
    spatial = [it for it in sch.get(blocks[at]).iter_vars if it.iter_type == 0]
    if len(spatial) < 2 or len(sch.get(blocks[at]).writes) != 1:
        return None
    try:
        # Producers (pads, broadcasts, weight arithmetic) stay loops of their own: a pad
        # inlined into a conv puts a bounds test in its inner loop, which stops the
        # vectoriser (LeNet's first conv: 10 ms instead of 0.5 at batch 100).
        # A producer of the epilogue only (SWAG's sqrt(var) * z beside its low-rank matmul)
        # is inlined into it: the write-back it joins may read one producer only.
        feeds = {str(r.source) for r in sch.get(blocks[at]).reads}
        for producer in blocks[:at]:
            if {str(w.source) for w in sch.get(producer).writes} & feeds:
                schedules._elementwise(sch, producer, lanes)
            else:
                sch.compute_inline(producer)
        # An epilogue that changes the shape (the slice back from a padded width, see
        # pad_widths) and everything after it run as their own vectorised loop over the
        # reduction's output: inlined into the tile, it wrote the padded columns past the
        # end of the smaller output buffer.
        full = _written_shape(sch, blocks[at])
        epilogues = list(blocks[at + 1 :])
        cut = next(
            (i for i, b in enumerate(epilogues) if _written_shape(sch, b) != full), len(epilogues)
        )
        weights = _conv_weights(sch, blocks[at], lanes)
        if weights is not None:
            # the weights copied per call into [in, kh, kw, out] (2,400 values for LeNet's
            # second conv), so a vector of output channels is one load, as for PFP
            cache = sch.cache_read(blocks[at], weights, "global")
            sch.transform_layout(cache, ("write", 0), lambda o, i, h, w: (i, h, w, o))
            schedules._elementwise(sch, cache, lanes)
            schedules._conv_channels(sch, blocks[at], lanes, epilogues[:cut])
        else:
            schedules._reduction(sch, blocks[at], lanes, epilogues[:cut], all_rows=True)
        if cut < len(epilogues):
            for block in epilogues[cut:-1]:
                sch.compute_inline(block)
            schedules._elementwise(sch, epilogues[-1], lanes)
    except (RuntimeError, ValueError):  # s_tir.ScheduleError is a RuntimeError
        return None
    return sch.mod["main"]


def _index_divisors(block: Any) -> list[int]:
    """The constants a block's reads divide or take the remainder by: a reshape folded
    into a transpose reads [j // N, j % N]; a vector that stays inside one N-run keeps
    those per-lane integer divisions out of the loop (the simplifier proves them away)."""
    import tvm
    from tvm import tirx

    found: list[int] = []

    def visit(node: Any) -> None:
        if isinstance(node, (tirx.FloorDiv, tirx.FloorMod)) and isinstance(node.b, tirx.IntImm):
            found.append(int(node.b.value))
        for child in ("a", "b", "value"):  # index arithmetic: binary ops and casts
            sub = getattr(node, child, None)
            if isinstance(sub, tvm.ir.expr.Expr):
                visit(sub)

    for region in block.reads:
        for r in region.region:
            visit(r.min)
    return found


def schedule_injective(func: Any, lanes: int) -> Any | None:
    """A fused function of elementwise, broadcast, transpose and reshape blocks (no
    reduction): one loop nest in 16 x lanes tiles of its output's last two axes, the
    tiles' rows parallel, each tile row one vector. None when it is not of that shape.

    Left to DLight (which has no rule for it) it stays a serial scalar nest per block:
    sampling SVI's first-layer weights and packing them for the GEMM (mu + sigma * eps,
    transposed, 7.8 M values) took 15 ms, longer than the GEMM. Tiled, the strided side
    of a transpose (the reads) revisits the same cache lines for the tile's 16 rows."""
    from tvm import s_tir

    from plugins.backends.tvm import schedules

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if any(schedules.reduces(sch, b) for b in blocks):
        return None
    try:
        for block in blocks[:-1]:
            sch.compute_inline(block)
        loops = sch.get_loops(blocks[-1])
        if len(loops) < 2:
            schedules._elementwise(sch, blocks[-1], lanes)
            return sch.mod["main"]
        *lead, rows, cols = loops
        width = schedules._extent(sch, cols)
        width = math.gcd(
            width, *(d for d in _index_divisors(sch.get(blocks[-1])) if width % d == 0)
        )
        col_out, lane = sch.split(cols, [None, schedules._divisor(width, lanes)])
        row_out, row = sch.split(rows, [None, schedules._divisor(schedules._extent(sch, rows), 16)])
        sch.reorder(*lead, row_out, col_out, row, lane)
        sch.parallel(sch.fuse(*lead, row_out) if lead else row_out)
        sch.vectorize(lane)
    except (RuntimeError, ValueError):
        return None
    return sch.mod["main"]


def schedule_fused(mod: Any, lanes: int) -> Any:
    """schedule_func (or schedule_injective) on every PrimFunc of a fused module; the
    others are left to DLight."""
    import tvm
    from tvm import tirx

    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled"):
            done = schedule_func(func, lanes) or schedule_injective(func, lanes)
            if done is not None:
                func = done.with_attrs({"global_symbol": gv.name_hint, "tirx.is_scheduled": True})
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs)
