"""Every method's program on TVM against eager PyTorch, torch.compile and ONNX Runtime.

    .venv/bin/python benchmarks/tvm_speedup.py [--quick] [--trials N] [--batches 1 10 100 1000]

Programs: the eight methods' inference programs (deterministic, MC dropout, ensemble, SVI,
SWAG, Laplace, linearised, PFP) for MLP 784-100-100-10 and LeNet-5 on 28x28 inputs, each
built from a *random posterior of the right shapes* (inference cost does not depend on
the weight values): SVI mean-field mu/sigma around the initial weights, SWAG variances and
rank-20 deviations, a Kronecker-factored last-layer Laplace with random orthogonal
factors, ensemble members from independent initialisations; each method's default
config (samples, members, rank). Sampled programs draw their noise inside every timed
call, on every backend, so the sampling cost is in every number: `tvm` draws it inside
the compiled module (backend.noise=philox, its default), `tvm-fed` takes torch's draws as
inputs (noise=torch), as ONNX Runtime does; eager and torch.compile draw with torch.

Backends: `tvm` (backend default: hand schedules for PFP, our register-tiled
matmul/conv schedules plus DLight for the generic path), eager PyTorch, torch.compile
(static shapes), and `onnxruntime` when the registry has it. Each program's backends
are built at the batch size and timed in the same interleaved rounds (harness.timing),
median ms per call, so ratios share the machine's state; PFP's group also times SVI
eager and the deterministic network on TVM for its cross-program ratios (see groups).
PFP also on TVM untuned (`tune=none`) and with MetaSchedule (`--trials` > 0), and a
per-operator breakdown of PFP on TVM (each PrimFunc timed alone).

Writes results/tvm_speedup.md and results/tvm_speedup.png and logs both, with every
latency as a metric, to MLflow (--tracking-uri).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow

from harness import registry
from harness.api import DataSpec, InferenceProgram, Posterior
from harness.moments import build_ops, diagonal_moments
from harness.timing import TimingConfig, interleaved
from plugins.backends.torch_compile import TorchCompileBackend, TorchCompileConfig
from plugins.backends.tvm import TVMConfig
from plugins.backends.tvm.backend import TVMBackend
from plugins.methods.deterministic import SinglePass
from plugins.methods.ensemble import EnsembleConfig, StackedEnsemble
from plugins.methods.laplace import LaplaceConfig, LaplaceMethod
from plugins.methods.linearised import Linearised, LinearisedConfig
from plugins.methods.mc_dropout import DropoutSampler, MCDropoutConfig
from plugins.methods.pfp.program import PFPProgram
from plugins.methods.svi import SVI, SVIConfig
from plugins.methods.swag import SWAG, SWAGConfig
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

SPEC = DataSpec((1, 28, 28), 10)
MODELS = {
    "mlp": lambda dropout=0.0: MLP().factory(MLPConfig(hidden=[100, 100], dropout=dropout), SPEC),
    "lenet5": lambda dropout=0.0: LeNet5().factory(LeNet5Config(dropout=dropout), SPEC),
}
PROGRAMS = (
    "deterministic",
    "mc_dropout",
    "ensemble",
    "svi",
    "swag",
    "laplace",
    "linearised",
    "pfp",
)
BACKENDS = ("tvm", "tvm-fed", "eager", "torch.compile", "onnxruntime")
SAMPLED = ("mc_dropout", "svi", "swag")  # programs with random draws: also `tvm-fed`
# torch.compile specialises per batch size (dynamic=false): 10-20 s per program and size.
# SVI, SWAG, Laplace and linearised under it would add ~8 minutes to a full run and are
# bound by weight sampling (SVI, SWAG); --compile-programs adds them.
COMPILED = ("deterministic", "mc_dropout", "ensemble", "pfp")


def random_posterior(net: torch.nn.Module, seed: int) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in net.named_parameters():
        tensors[f"mu.{name}"] = p.detach().clone()
        tensors[f"sigma.{name}"] = 0.05 * torch.rand(p.shape, generator=g) + 1e-3
    return Posterior("svi", tensors)


def swag_posterior(net: torch.nn.Module, rank: int, seed: int) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    for name, p in net.named_parameters():
        tensors[f"var.{name}"] = 1e-2 * torch.rand(p.shape, generator=g)
        tensors[f"dev.{name}"] = 0.1 * torch.randn(rank, *p.shape, generator=g)
    return Posterior("swag", tensors, {"snapshots": rank, "rank": rank})


def laplace_posterior(net: torch.nn.Module, seed: int) -> Posterior:
    """Kronecker-factored last layer (the method's default): random orthogonal factors."""
    g = torch.Generator().manual_seed(seed)
    (w_name, w), (b_name, b) = list(net.named_parameters())[-2:]

    def orth(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, n, generator=g))[0]

    c, d = w.shape
    tensors = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    tensors |= {
        f"kron.{w_name}.q0": orth(c),
        f"kron.{w_name}.l0": torch.rand(c, generator=g) + 0.5,
        f"kron.{w_name}.q1": orth(d),
        f"kron.{w_name}.l1": torch.rand(d, generator=g) + 0.5,
        f"kron.{w_name}.delta": torch.tensor(1.0),
        f"kron.{b_name}.q0": orth(b.shape[0]),
        f"kron.{b_name}.l0": torch.rand(b.shape[0], generator=g) + 0.5,
        f"kron.{b_name}.delta": torch.tensor(1.0),
    }
    meta = {"hessian": "kron", "params": [w_name, b_name], "subset": "last_layer"}
    return Posterior("laplace", tensors, meta)


def programs(model: str, names: list[str]) -> dict[str, InferenceProgram]:
    factory = MODELS[model]()
    torch.manual_seed(0)
    net = factory().eval()
    post = random_posterior(net, 1)
    mu, var = diagonal_moments(post, net)
    make = {
        "deterministic": lambda: SinglePass(net),
        "mc_dropout": lambda: DropoutSampler(
            MODELS[model](0.2)().eval(), MCDropoutConfig().samples
        ),
        "ensemble": lambda: StackedEnsemble(
            [factory().eval() for _ in range(EnsembleConfig().members)]
        ),
        "svi": lambda: SVI().program(post, factory, SVIConfig()),
        "swag": lambda: SWAG().program(
            swag_posterior(net, SWAGConfig().rank, 2), factory, SWAGConfig()
        ),
        "laplace": lambda: LaplaceMethod().program(
            laplace_posterior(net, 3), factory, LaplaceConfig()
        ),
        "linearised": lambda: Linearised().program(post, factory, LinearisedConfig()),
        "pfp": lambda: PFPProgram(build_ops(net, mu, var)),
    }
    return {name: make[name]().eval() for name in names}


def eager(program: torch.nn.Module):
    def call(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return program(x)

    return call


def onnxruntime_backend() -> tuple[Any, Any] | None:
    """The `onnxruntime` backend and its default config from the registry, or None."""
    reg = registry.default()
    if "onnxruntime" not in reg.plugins("backend"):
        return None
    backend = reg.get("backend", "onnxruntime")
    schemas = [
        s.node
        for s in reg.collect("bnn_harness_config_schemas")
        if s.group == "backend" and getattr(s.node, "name", None) == "onnxruntime"
    ]
    if not schemas:
        return None
    cfg = schemas[0]()
    if hasattr(cfg, "intra_op_threads"):
        cfg = replace(cfg, intra_op_threads=torch.get_num_threads())
    return backend, cfg


def executables(
    progs: dict[str, InferenceProgram],
    wanted: list[str],
    args: argparse.Namespace,
    example: torch.Tensor,
    notes: list[str],
    tag: str,
    ort: tuple[Any, Any] | None,
) -> dict[str, Any]:
    """`program/backend` -> callable for each wanted name, built at example's batch size.
    A program a backend cannot compile is noted. ort: onnxruntime_backend()'s answer."""
    tvm = TVMBackend()
    cfg = TVMConfig(threads=args.threads, tuning_dir=args.tuning_dir, trials=max(args.trials, 1))
    ms = replace(cfg, tune="metaschedule", trials=args.trials)
    builders = {
        "tvm": lambda p: tvm.compile(p, example, cfg),
        "tvm-fed": lambda p: tvm.compile(p, example, replace(cfg, noise="torch")),
        "tvm-none": lambda p: tvm.compile(p, example, replace(cfg, tune="none")),
        "tvm-metaschedule": lambda p: tvm.compile(p, example, ms),
        "eager": eager,
        "torch.compile": lambda p: TorchCompileBackend().compile(
            p, example, TorchCompileConfig(dynamic="false")
        ),
    }
    if ort is not None:
        builders["onnxruntime"] = lambda p: ort[0].compile(p, example, ort[1])
    exes: dict[str, Any] = {}
    for name in wanted:
        prog, backend = name.split("/")
        start = time.perf_counter()
        try:
            exes[name] = builders[backend](progs[prog])
        except Exception as err:
            notes.append(f"{tag} {name}: {type(err).__name__}: {str(err).splitlines()[0]}")
        else:
            took = time.perf_counter() - start
            print(f"[bench] {tag} {name}: built in {took:.1f}s", flush=True)
            if backend == "tvm-metaschedule":
                info = exes[name].describe()
                notes.append(
                    f"{tag} {name}: {info['applied']} of {info['tasks']} kernels from tuning "
                    f"records ({info.get('database', '-')}); {info['trials']} trials measured "
                    f"by this build, which took {took:.0f} s"
                )
    return exes


def groups(args: argparse.Namespace, model: str, batch: int, ort: bool) -> list[list[str]]:
    """Executables timed together: each program's backends interleaved, one program at a
    time, built at the batch size and dropped after it. Held all at once, every backend's
    SVI-100 LeNet-5 at batch 1000 (GBs of activations each) beside the rest took 23.5 GB
    and the kernel killed the run. PFP's group also holds the programs its ratios compare
    with (SVI eager, the deterministic network on TVM), so those ratios stay interleaved."""
    backends = ["tvm", "eager", *(["onnxruntime"] if ort else [])]
    out = []
    for prog in args.programs:
        names = [f"{prog}/{b}" for b in backends]
        if prog in SAMPLED:
            names.append(f"{prog}/tvm-fed")
        if prog in args.compile_programs:
            names.append(f"{prog}/torch.compile")
        if prog == "pfp":
            tuned = (
                args.trials > 0
                and batch in (args.metaschedule_batches or args.batches)
                and model in (args.metaschedule_models or args.models)
            )
            names += ["pfp/tvm-none", *(["pfp/tvm-metaschedule"] if tuned else [])]
            names += ["svi/eager", "deterministic/tvm"]
        out.append(names)
    return out


def checked(exes: dict[str, Any], x: torch.Tensor, notes: list[str], tag: str) -> dict[str, Any]:
    """The executables that run at this batch size (a first call also builds TVM's module
    for it and compiles torch.compile's graph, outside the timing)."""
    out = {}
    for name, fn in exes.items():
        try:
            fn(x)
        except Exception as err:
            notes.append(f"{tag} {name}: {type(err).__name__}: {str(err).splitlines()[0]}")
        else:
            out[name] = fn
    return out


def operator_breakdown(model: str, batch: int, threads: int) -> list[tuple[str, float]]:
    """Each PrimFunc of PFP on TVM (hand schedules) timed alone: what bounds the total."""
    import tvm
    from tvm import tirx

    from plugins.backends.tvm import lowering, schedules
    from plugins.backends.tvm.backend import host_target, lanes, use_threads

    factory = MODELS[model]()
    torch.manual_seed(0)
    net = factory().eval()
    mu, var = diagonal_moments(random_posterior(net, 1), net)
    target = host_target()
    width = lanes(target)
    mod = lowering.to_relax(build_ops(net, mu, var), (batch, *SPEC.input_shape), pad_to=width)
    mod = schedules.schedule_module(mod, width)
    use_threads(threads)
    rows = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        signature = func.script().split("):\n")[0]
        shapes = [
            tuple(int(d) for d in re.findall(r"\d+", m.replace("int64", "")))
            for m in re.findall(r'T\.Buffer\(\((.*?)\), "float32"', signature)
        ]
        args = [tvm.runtime.tensor(np.random.rand(*s).astype("float32")) for s in shapes]
        fn = lib["main"]
        fn(*args)
        best = math.inf
        for _ in range(5):
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 0.02:
                fn(*args)
                n += 1
            best = min(best, (time.perf_counter() - start) / n * 1e3)
        rows.append((gv.name_hint, best))
    return rows


def run(args: argparse.Namespace, notes: list[str]) -> tuple[list[dict[str, Any]], dict]:
    timing = TimingConfig(warmup=args.warmup, rounds=args.rounds, min_block_s=args.min_block_s)
    rows, breakdown = [], {}
    ort = onnxruntime_backend()  # the registry is built once, not per group
    if ort is None:
        notes.append("onnxruntime: no `onnxruntime` backend in the registry; column skipped")
    for model in args.models:
        for b in args.batches:
            x = torch.randn(b, *SPEC.input_shape, generator=torch.Generator().manual_seed(b))
            lat: dict[str, float] = {}
            pfp_group: dict[str, float] = {}
            for names in groups(args, model, b, ort is not None):
                tag = f"{model} b={b}"
                needed = {n.split("/")[0] for n in names}
                progs = programs(model, [p for p in PROGRAMS if p in needed])
                exes = executables(progs, names, args, x, notes, tag, ort)
                ready = checked(exes, x, notes, tag)
                got = {k: v.median_ms for k, v in interleaved(ready, x, timing).items()}
                del exes, ready, progs
                gc.collect()
                own = names[0].split("/")[0]
                lat |= {k: v for k, v in got.items() if k.startswith(f"{own}/")}
                if own == "pfp":
                    pfp_group = got
            rows.append({"model": model, "batch": b, "lat": lat, "pfp_group": pfp_group})
            print(f"[bench] {model} b={b}: " + ", ".join(f"{k}={v:.3g}ms" for k, v in lat.items()))
            if "pfp" in args.programs:
                breakdown[(model, b)] = operator_breakdown(model, b, args.threads)
    return rows, breakdown


def cpu() -> str:
    """The CPU model and its vector flags: the same schedule differs by machine."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vec = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4")) or f == "neon")
    return f"{model} ({', '.join(vec) or 'no vector flags read'})"


def ratios(row: dict[str, Any]) -> dict[str, float]:
    """TVM vs eager per program; PFP's ratios from PFP's own interleaved group."""
    out = {}
    lat = row.get("pfp_group") or row["lat"]
    pfp = lat.get("pfp/tvm", math.nan)
    for name, key in [
        ("svi/eager", "pfp_tvm_vs_svi_eager"),
        ("deterministic/tvm", "pfp_over_det_tvm"),
        ("pfp/eager", "pfp_tvm_vs_eager"),
        ("pfp/torch.compile", "pfp_tvm_vs_torch_compile"),
        ("pfp/onnxruntime", "pfp_tvm_vs_onnxruntime"),
        ("pfp/tvm-none", "pfp_hand_vs_none"),
    ]:
        if name in lat:
            out[key] = pfp / lat[name] if key == "pfp_over_det_tvm" else lat[name] / pfp
    lat = row["lat"]
    for prog in PROGRAMS:
        if f"{prog}/tvm" in lat and f"{prog}/eager" in lat:
            out[f"{prog}_tvm_vs_eager"] = lat[f"{prog}/eager"] / lat[f"{prog}/tvm"]
    return out


def _cell(lat: dict[str, float], name: str) -> str:
    return f"{lat[name]:.3g}" if name in lat else "-"


def markdown(rows, breakdown, args: argparse.Namespace, notes: list[str]) -> str:
    svi = SVIConfig()
    lines = [
        "# Every program on TVM against eager PyTorch, torch.compile and ONNX Runtime",
        "",
        f"CPU: {cpu()}. {args.threads} thread(s) for torch, TVM and ONNX Runtime; load "
        f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. "
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/tvm_speedup.py', *sys.argv[1:]])}` "
        f"({args.seconds:.0f} s).",
        "",
        "Random posteriors of the right shapes (see the script's docstring); each method's "
        f"default config (MC dropout {MCDropoutConfig().samples} samples, ensemble "
        f"{EnsembleConfig().members} members, SVI {svi.samples} weight samples"
        f"{' with' if svi.local_reparam else ' without'} local reparameterisation, SWAG "
        f"{SWAGConfig().samples} samples, Laplace last-layer KFAC GLM probit). Noise of "
        "sampled programs, drawn inside every timed call on every backend: `tvm` draws it "
        "inside the compiled module (Philox-4x32-10, backend.noise=philox, the default), "
        "`tvm-fed` and ONNX Runtime take torch's draws as inputs, eager and torch.compile "
        "draw with torch. Median ms per call; `x` = eager / TVM.",
        "",
    ]
    for model in args.models:
        lines += [f"## {model}", ""]
        mine = [r for r in rows if r["model"] == model]
        header = "| program | batch | " + " | ".join(BACKENDS) + " | TVM vs eager |"
        lines += [header, "|---|---:|" + "---:|" * (len(BACKENDS) + 1)]
        for prog in args.programs:
            for row in mine:
                lat = row["lat"]
                cells = " | ".join(_cell(lat, f"{prog}/{b}") for b in BACKENDS)
                r = ratios(row).get(f"{prog}_tvm_vs_eager")
                lines.append(
                    f"| {prog} | {row['batch']} | {cells} | "
                    + (f"{r:.2f}x |" if r is not None else "- |")
                )
        lines.append("")
    lines += [
        "## PFP on TVM",
        "",
        "| model | batch | PFP TVM ms | untuned (none) | MetaSchedule | vs SVI eager | "
        "PFP/det (TVM) | vs eager | vs torch.compile | vs onnxruntime |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lat, r = row["lat"], ratios(row)

        def x(key: str, fmt: str = "{:.1f}x", r=r) -> str:
            return fmt.format(r[key]) if key in r else "-"

        lines.append(
            f"| {row['model']} | {row['batch']} | {_cell(lat, 'pfp/tvm')} "
            f"| {_cell(lat, 'pfp/tvm-none')} | {_cell(lat, 'pfp/tvm-metaschedule')} "
            f"| {x('pfp_tvm_vs_svi_eager', '{:.0f}x')} | {x('pfp_over_det_tvm', '{:.2f}')} "
            f"| {x('pfp_tvm_vs_eager')} | {x('pfp_tvm_vs_torch_compile')} "
            f"| {x('pfp_tvm_vs_onnxruntime')} |"
        )
    if breakdown:
        lines += [
            "",
            "## PFP on TVM, per operator (each PrimFunc timed alone, best of 5, ms)",
            "",
        ]
        for (model, b), ops in breakdown.items():
            total = sum(ms for _, ms in ops)
            parts = ", ".join(f"{name} {ms:.3g} ({ms / total:.0%})" for name, ms in ops)
            lines.append(f"- {model} b={b}: total {total:.3g}; {parts}")
    skipped = [p for p in args.programs if p not in args.compile_programs]
    if skipped:
        notes = [f"torch.compile: not run for {', '.join(skipped)} (--compile-programs)", *notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4), squeeze=False)
    for ax, model in zip(axes[0], args.models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for prog in args.programs:
            pts = [(r["batch"], ratios(r).get(f"{prog}_tvm_vs_eager")) for r in mine]
            pts = [(b, v) for b, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=prog)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="eager / TVM latency")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: MLP, batch 1 and 10")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument(
        "--compile-programs",
        nargs="+",
        default=None,
        choices=PROGRAMS,
        help="programs also timed under torch.compile (default: COMPILED; --quick: pfp)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 10, 100, 1000])
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule budget; 0: skip")
    parser.add_argument(
        "--metaschedule-batches",
        nargs="+",
        type=int,
        default=None,
        help="batch sizes PFP is tuned and timed at with MetaSchedule (default: all)",
    )
    parser.add_argument(
        "--metaschedule-models",
        nargs="+",
        default=None,
        choices=list(MODELS),
        help="models PFP is tuned and timed for with MetaSchedule (default: all)",
    )
    parser.add_argument("--tuning-dir", default="results/tvm_tuning")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and TVM threads; 0: all available cores"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-block-s", type=float, default=0.05)
    parser.add_argument("--out", default="results")
    parser.add_argument("--tracking-uri", default="sqlite:///results/mlflow.db")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches = ["mlp"], [1, 10]
        args.rounds, args.warmup, args.min_block_s = 2, 1, 0.01
    if args.compile_programs is None:
        args.compile_programs = ["pfp"] if args.quick else list(COMPILED)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)  # eager torch on as many threads as TVM: a fair race
    notes: list[str] = []
    start = time.perf_counter()
    rows, breakdown = run(args, notes)
    args.seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "tvm_speedup.md", out / "tvm_speedup.png"
    md.write_text(markdown(rows, breakdown, args, notes))
    plot(rows, args, png)
    print(md.read_text())
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("bnn-harness-benchmarks")
    with mlflow.start_run(run_name="tvm_speedup"):
        mlflow.log_params({"trials": args.trials, "rounds": args.rounds, "models": args.models})
        for row in rows:
            tag = f"{row['model']}/b{row['batch']}"
            metrics = {f"lat/{tag}/{k}_ms": v for k, v in row["lat"].items()}
            metrics |= {f"{k}/{tag}": v for k, v in ratios(row).items() if math.isfinite(v)}
            clean = {re.sub(r"[^\w\-/. ]", "_", k).replace("/", "_"): v for k, v in metrics.items()}
            mlflow.log_metrics(clean)
        mlflow.log_artifact(str(md))
        mlflow.log_artifact(str(png))


if __name__ == "__main__":
    main()
