"""PFP on TVM against the alternatives, timed interleaved in one process.

    .venv/bin/python benchmarks/tvm_speedup.py [--trials 64] [--batches 1 10 100 1000]

MLP 784-100-100-10 and LeNet-5 (28x28) with random mean-field posteriors (inference cost
does not depend on the weight values). For each batch size, every executable of a model
is timed in the same interleaved rounds (harness.timing), so the ratios share the
machine's state. Compared:

- PFP on TVM (hand schedules: tune=default; plain lowering: tune=none; MetaSchedule with
  --trials > 0) against SVI with 100 samples on eager PyTorch, weight sampling and local
  reparameterisation (the seed's headline comparison);
- PFP on TVM against the deterministic network on TVM (same tuning mode): the price of
  carrying a variance;
- PFP on TVM against the same PFP program on eager PyTorch and on torch.compile.

Writes results/tvm_speedup.md and results/tvm_speedup.png and logs both, with every
latency as a metric, to MLflow (--tracking-uri).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow

from harness.api import DataSpec, Posterior
from harness.moments import build_ops, diagonal_moments
from harness.timing import TimingConfig, interleaved
from plugins.backends.torch_compile import TorchCompileBackend, TorchCompileConfig
from plugins.backends.tvm import TVMConfig
from plugins.backends.tvm.backend import TVMBackend
from plugins.methods.deterministic import SinglePass
from plugins.methods.pfp.program import PFPProgram
from plugins.methods.svi import SampledWeights
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

SPEC = DataSpec((1, 28, 28), 10)
MODELS = {
    "mlp": lambda: MLP().factory(MLPConfig(hidden=[100, 100]), SPEC),
    "lenet5": lambda: LeNet5().factory(LeNet5Config(), SPEC),
}


def random_posterior(net: torch.nn.Module, seed: int) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in net.named_parameters():
        tensors[f"mu.{name}"] = p.detach().clone()
        tensors[f"sigma.{name}"] = 0.05 * torch.rand(p.shape, generator=g) + 1e-3
    return Posterior("svi", tensors)


def eager(program: torch.nn.Module):
    program = program.eval()

    def call(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return program(x)

    return call


def executables(model: str, args: argparse.Namespace, example: torch.Tensor) -> dict[str, Any]:
    factory = MODELS[model]()
    torch.manual_seed(0)
    net = factory().eval()
    post = random_posterior(net, 1)
    mu, var = diagonal_moments(post, net)
    pfp = PFPProgram(build_ops(net, mu, var))
    det = SinglePass(net)
    tvm = TVMBackend()
    modes = ["none", "default"] + (["metaschedule"] if args.trials > 0 else [])
    exes: dict[str, Any] = {}
    for mode in modes:
        cfg = TVMConfig(
            tune=mode, trials=args.trials, tuning_dir=args.tuning_dir, threads=args.threads
        )
        exes[f"pfp_tvm_{mode}"] = tvm.compile(pfp, example, cfg)
        exes[f"det_tvm_{mode}"] = tvm.compile(det, example, cfg)
    exes["pfp_torch"] = eager(pfp)
    exes["pfp_torch_compile"] = TorchCompileBackend().compile(
        pfp, example, TorchCompileConfig(dynamic="false")
    )
    exes["svi100_torch"] = eager(SampledWeights(factory(), post, 100, local_reparam=False))
    exes["svi100_lrt_torch"] = eager(SampledWeights(factory(), post, 100, local_reparam=True))
    return exes


def best_tvm(lat: dict[str, float], kind: str) -> tuple[str, float]:
    """The fastest TVM tuning mode of `kind` (pfp or det) at this batch size."""
    cands = {k: v for k, v in lat.items() if k.startswith(f"{kind}_tvm_")}
    name = min(cands, key=cands.get)
    return name.rsplit("_", 1)[-1], cands[name]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    timing = TimingConfig(warmup=args.warmup, rounds=args.rounds, min_block_s=args.min_block_s)
    rows = []
    for model in args.models:
        start = time.perf_counter()
        exes = executables(model, args, torch.randn(1, *SPEC.input_shape))
        print(f"[bench] {model}: built in {time.perf_counter() - start:.1f}s", flush=True)
        for b in args.batches:
            x = torch.randn(b, *SPEC.input_shape, generator=torch.Generator().manual_seed(b))
            lat = {k: v.median_ms for k, v in interleaved(exes, x, timing).items()}
            rows.append({"model": model, "batch": b, "lat": lat})
            print(f"[bench] {model} b={b}: " + ", ".join(f"{k}={v:.3g}ms" for k, v in lat.items()))
    return rows


def ratios(row: dict[str, Any]) -> dict[str, float]:
    lat = row["lat"]
    mode, pfp = best_tvm(lat, "pfp")
    out = {
        "speedup_vs_svi100": lat["svi100_torch"] / pfp,
        "speedup_vs_svi100_lrt": lat["svi100_lrt_torch"] / pfp,
        "pfp_over_det_tvm": pfp / lat[f"det_tvm_{mode}"],
        "speedup_vs_pfp_eager": lat["pfp_torch"] / pfp,
        "speedup_vs_pfp_torch_compile": lat["pfp_torch_compile"] / pfp,
        "tuned_over_untuned": lat["pfp_tvm_none"] / lat["pfp_tvm_default"],
    }
    if "pfp_tvm_metaschedule" in lat:
        out["metaschedule_over_untuned"] = lat["pfp_tvm_none"] / lat["pfp_tvm_metaschedule"]
    return out


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


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    names = list(rows[0]["lat"])
    lines = [
        "# PFP on TVM: speedups (interleaved timing in one process)",
        "",
        f"CPU: {cpu()}. {torch.get_num_threads()} threads for torch and for TVM, "
        f"`{platform.processor() or platform.platform()}`; host CPU, not ARM; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. "
        f"Command: `.venv/bin/python benchmarks/tvm_speedup.py "
        f"--trials {args.trials} --rounds {args.rounds}`.",
        "",
        "PFP on TVM = its fastest tuning mode at that batch size (column `mode`); "
        "SVI-100 = 100 weight samples per input on eager PyTorch (`lrt`: local "
        "reparameterisation, 100 samples of the pre-activations).",
        "",
        "| model | batch | mode | PFP TVM ms | vs SVI-100 | vs SVI-100 LRT | PFP/det (TVM) "
        "| vs PFP eager | vs PFP torch.compile | hand/none |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mode, pfp = best_tvm(row["lat"], "pfp")
        r = ratios(row)
        lines.append(
            f"| {row['model']} | {row['batch']} | {mode} | {pfp:.3g} "
            f"| {r['speedup_vs_svi100']:.0f}x | {r['speedup_vs_svi100_lrt']:.0f}x "
            f"| {r['pfp_over_det_tvm']:.2f} | {r['speedup_vs_pfp_eager']:.1f}x "
            f"| {r['speedup_vs_pfp_torch_compile']:.1f}x | {r['tuned_over_untuned']:.2f}x |"
        )
    lines += ["", "Median latency per call (ms):", ""]
    lines.append("| model | batch | " + " | ".join(names) + " |")
    lines.append("|---|---:|" + "---:|" * len(names))
    for row in rows:
        cells = " | ".join(f"{row['lat'][n]:.3g}" for n in names)
        lines.append(f"| {row['model']} | {row['batch']} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    series = {
        "speedup_vs_svi100": "vs SVI-100 (torch)",
        "speedup_vs_svi100_lrt": "vs SVI-100 LRT (torch)",
        "speedup_vs_pfp_eager": "vs PFP eager torch",
        "speedup_vs_pfp_torch_compile": "vs PFP torch.compile",
    }
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        batches = [r["batch"] for r in mine]
        for key, label in series.items():
            ax.plot(batches, [ratios(r)[key] for r in mine], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="speedup of PFP on TVM")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 10, 100, 1000])
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule budget; 0: skip")
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
    args.threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)  # eager torch on as many threads as TVM: a fair race
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "tvm_speedup.md", out / "tvm_speedup.png"
    md.write_text(markdown(rows, args))
    plot(rows, png)
    print(md.read_text())
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("bnn-harness-benchmarks")
    with mlflow.start_run(run_name="tvm_speedup"):
        mlflow.log_params({"trials": args.trials, "rounds": args.rounds, "models": args.models})
        for row in rows:
            tag = f"{row['model']}/b{row['batch']}"
            metrics = {f"lat/{tag}/{k}_ms": v for k, v in row["lat"].items()}
            metrics |= {f"{k}/{tag}": v for k, v in ratios(row).items() if math.isfinite(v)}
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()})
        mlflow.log_artifact(str(md))
        mlflow.log_artifact(str(png))


if __name__ == "__main__":
    main()
