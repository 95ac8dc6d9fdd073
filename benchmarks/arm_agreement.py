"""Numerical agreement of backend=tvm_arm on the emulated aarch64 board with host TVM and
eager PyTorch.

PFP (MLP and LeNet-5), SVI, MC dropout and a deep ensemble are trained briefly on the 8x8
`dirty_digits` data (cached under --cache-dir) and their programs run on three executables:
the aarch64 module on the emulated board (`make arm-sim`, 127.0.0.1:9090), the host's TVM
module and eager PyTorch. Each call is preceded by the same `torch.manual_seed`, so the
sampling programs get the same random draws everywhere. Per output (logit mean and
variance for moments, the logits of every draw for samples) it prints the largest
absolute error and the largest relative error, |a - b| / max(|b|, 1e-3), over all
elements of a batch of --n test inputs. The tests (tests/test_tvm_arm.py) assert
tolerances; this script says how close it actually is.

    make arm-sim
    .venv/bin/python benchmarks/arm_agreement.py --out results/arm_agreement.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from harness import config, machine, registry, runner
from harness.api import InferenceProgram, sample_draws, with_draws
from plugins.backends.tvm import TVMArmConfig, TVMConfig
from plugins.backends.tvm.backend import TVMArmBackend, TVMBackend

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "PFP MLP": ["method=pfp", "model=mlp"],
    "PFP LeNet-5": ["method=pfp", "model=lenet5"],
    "SVI": ["method=svi", "model=mlp"],
    "MC dropout": ["method=mc_dropout", "model=mlp"],
    "ensemble": ["method=ensemble", "model=mlp"],
}
REL_FLOOR = 1e-3


def program_for(
    overrides: list[str], args: argparse.Namespace
) -> tuple[InferenceProgram, torch.Tensor]:
    """The method's program on a briefly trained posterior, and the test inputs."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "dataset=dirty_digits",
                f"method.fit.epochs={args.epochs}",
                f"seed={args.seed}",
                f"cache_dir={args.cache_dir}",
                *overrides,
            ],
        )
    job = runner.prepare(cfg, registry.default())
    posterior, _ = runner.fit_or_load(job, cfg.method)
    program = runner.make_program(job, posterior, cfg.method).eval()
    return program, job.data.test[0][: args.n]


def outputs(fn: Callable, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """One call with the global generator at `seed`: the draws fed to TVM are then the same."""
    torch.manual_seed(seed)
    out = fn(x)
    return tuple(o.detach().clone() for o in (out if isinstance(out, tuple) else (out,)))


def eager(program: InferenceProgram, x: torch.Tensor) -> Callable:
    """The program in PyTorch, fed its draws as the TVM executables are."""
    module, draws = with_draws(program, x)

    def call(x: torch.Tensor):
        with torch.no_grad():
            return module(x, *sample_draws(draws))

    return call


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs()
    rel = diff / b.double().abs().clamp_min(REL_FLOOR)
    return float(diff.max()), float(rel.max())


def run(args: argparse.Namespace) -> list[dict]:
    config.register(registry.default())
    # draws fed by torch on all three, so one seed gives all three the same numbers
    arm_cfg = TVMArmConfig(host=args.host, port=args.port, noise="torch")
    rows = []
    for name, overrides in CASES.items():
        program, x = program_for(overrides, args)
        start = time.perf_counter()
        exe = TVMArmBackend().compile(program, x, arm_cfg)
        try:
            device = exe.describe()["tags"]["device"]
            on_arm = outputs(exe, x, args.seed)
        finally:
            exe.close()
        arm_s = time.perf_counter() - start
        host_cfg = TVMConfig(noise="torch")
        on_host = outputs(TVMBackend().compile(program, x, host_cfg), x, args.seed)
        in_torch = outputs(eager(program, x), x, args.seed)
        parts = ("mean", "variance") if program.kind == "moments" else ("logits",)
        for part, a, h, t in zip(parts, on_arm, on_host, in_torch, strict=True):
            rows.append(
                {
                    "case": name,
                    "output": f"{part} {list(a.shape)}",
                    "device": device,
                    "host": errors(a, h),
                    "torch": errors(a, t),
                    "host_vs_torch": errors(h, t),
                    "finite": bool(torch.isfinite(a).all()),
                    "arm_s": arm_s,
                }
            )
        print(f"[arm_agreement] {name}: done ({arm_s:.1f} s on the board)", flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    tvm_version = importlib.metadata.version("apache-tvm")
    lines = [
        "# tvm_arm on the emulated aarch64 board: numerical agreement",
        "",
        f"Command: `{command}` (board: `make arm-sim`, qemu-user on {args.host}:{args.port}).",
        f"Host: {machine.cpu()}, {platform.system()} {platform.machine()}; "
        f"apache-tvm {tvm_version} on both sides (aarch64 wheel on the board).",
        f"Data: `dirty_digits` (8x8), {args.n} test inputs in one batch; posteriors trained "
        f"{args.epochs} epochs, seed {args.seed}; the same torch seed before every call, so "
        "sampling programs get the same draws on every executable.",
        "",
        f"Relative error: max over elements of |a - b| / max(|b|, {REL_FLOOR:g}); 0 means "
        "bit-identical. Timings under an emulator say nothing about a board and are not given.",
        "",
        "| program | output | device | arm vs host TVM: max abs | max rel "
        "| arm vs eager torch: max abs | max rel | host TVM vs eager: max abs | finite |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['output']} | {r['device']} | {r['host'][0]:.2e} "
            f"| {r['host'][1]:.2e} | {r['torch'][0]:.2e} | {r['torch'][1]:.2e} "
            f"| {r['host_vs_torch'][0]:.2e} | {'yes' if r['finite'] else 'NO'} |"
        )
    lines += [
        "",
        "Tolerances asserted by `tests/test_tvm_arm.py::test_emulated_board_matches_host_tvm_"
        "and_eager`: rtol = atol = 1e-4 against host TVM, 1e-3 against eager PyTorch.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--n", type=int, default=32, help="test inputs (one batch)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir", default=str(Path(tempfile.gettempdir()) / "bnn_arm_agreement_cache")
    )
    parser.add_argument("--out", type=Path, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    text = markdown(run(args), args, "python benchmarks/arm_agreement.py")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
