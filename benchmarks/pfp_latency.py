"""PFP vs SVI (100 samples; weight sampling and local reparameterisation) vs the deterministic
network on the eager PyTorch backend, timed interleaved in one process.

Random posteriors (means from the default initialisation, stds uniform in [0, 0.05)):
latency does not depend on trained values. Writes results/pfp_latency.md.

    .venv/bin/python benchmarks/pfp_latency.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from harness.api import DataSpec, Posterior
from harness.timing import TimingConfig, interleaved
from plugins.backends import TorchBackend, TorchConfig
from plugins.methods.deterministic import SinglePass
from plugins.methods.pfp import make_program
from plugins.methods.svi import SampledWeights
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

SPEC = DataSpec((1, 28, 28), 10)
MODELS = {
    "MLP 784-100-100-10": MLP().factory(MLPConfig(hidden=[100, 100]), SPEC),
    "LeNet-5 (28x28)": LeNet5().factory(LeNet5Config(), SPEC),
}
BATCHES = (1, 10, 100, 1000)
SAMPLES = 100
OUT = Path(__file__).resolve().parent.parent / "results" / "pfp_latency.md"


def random_posterior(net: torch.nn.Module) -> Posterior:
    tensors = {f"mu.{k}": v.detach().clone() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": 0.05 * torch.rand_like(v) for k, v in net.named_parameters()}
    return Posterior("svi", tensors)


def executables(factory) -> dict:
    net = factory().eval()
    post = random_posterior(net)
    programs = {
        "det": SinglePass(net),
        "pfp": make_program(post, factory),
        "svi_w": SampledWeights(factory(), post, SAMPLES, local_reparam=False),
        "svi_lrt": SampledWeights(factory(), post, SAMPLES, local_reparam=True),
    }
    example = torch.zeros(1, *SPEC.input_shape)
    return {k: TorchBackend().compile(p, example, TorchConfig()) for k, p in programs.items()}


def table(rows: list[dict]) -> str:
    head = (
        "| model | batch | deterministic ms | PFP ms | SVI-w ms | SVI-LRT ms "
        "| PFP / det | SVI-w / PFP | SVI-LRT / PFP |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['model']} | {r['batch']} | {r['det']:.3f} | {r['pfp']:.3f} | {r['svi_w']:.2f} "
        f"| {r['svi_lrt']:.2f} | {r['pfp'] / r['det']:.1f}x | {r['svi_w'] / r['pfp']:.0f}x "
        f"| {r['svi_lrt'] / r['pfp']:.0f}x |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-block-s", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TimingConfig(warmup=1, rounds=args.rounds, min_block_s=args.min_block_s)
    rows, start = [], time.perf_counter()
    for model, factory in MODELS.items():
        exes = executables(factory)
        for batch in BATCHES:
            lat = interleaved(exes, torch.randn(batch, *SPEC.input_shape), cfg)
            rows.append({"model": model, "batch": batch} | {k: v.median_ms for k, v in lat.items()})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# PFP latency vs SVI and the deterministic network (eager PyTorch, CPU)\n\n"
        f"Command: `.venv/bin/python benchmarks/pfp_latency.py --threads {args.threads} "
        f"--rounds {args.rounds}`. Median ms per call, {args.rounds} interleaved rounds of "
        f"blocks >= {args.min_block_s * 1e3:.0f} ms. SVI: {SAMPLES} samples, vmapped weight "
        "draws (SVI-w) or local reparameterisation (SVI-LRT), sampling inside the timed call. "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or '?'} "
        f"({platform.machine()}), {time.perf_counter() - start:.0f} s in all.\n\n" + table(rows)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
