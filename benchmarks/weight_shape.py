"""Weight-shape study (arXiv 2501.05564): does the predictive forget the weight-noise shape
as layers widen?

For each width (1, 4, 16, 64, 256) and depth (1-3) a mean-field posterior (mu, sigma) is
trained; its predictive is then sampled with z from family X and from the Gaussian at the
SAME (mu, sigma), and the two are compared (histogram KL and energy distance). Two ways
to get (mu, sigma), as in the seed:
  * trained with the Gaussian, deployed on X ("gaussian->X": train in software, run on a
    device with non-Gaussian noise);
  * trained with X itself ("X->X": the device noise is the variational family).
A third, independent Gaussian draw gives each estimator's finite-sample floor.

Regression: the 1-D task `regression1d`, Gaussian likelihood, full-batch ELBO.
Classification: the default data (dirty_digits) with the SVI plugin through the runner's
cache (a run of `experiment=weight_shape` with the same settings reuses the posteriors);
mean predictive probabilities compared by KL, sampled probability vectors by energy
distance.

    .venv/bin/python benchmarks/weight_shape.py   # writes results/weight_shape_divergence.*
    .venv/bin/python benchmarks/weight_shape.py --quick # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor
from torch.nn import functional as F

from harness import config, registry, runner
from plugins.datasets.regression import DOMAIN, Regression1D, Regression1DConfig
from plugins.methods import divergence, families
from plugins.methods.svi import MeanField
from plugins.models import MLP, MLPConfig

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (1, 4, 16, 64, 256)
DEPTHS = (1, 2, 3)
DEVICE_FAMILIES = ("bimodal", "empirical")
COLOURS = {
    "gaussian->bimodal": "tab:green",
    "gaussian->empirical": "tab:red",
    "bimodal->bimodal": "tab:blue",
    "empirical->empirical": "tab:orange",
}
CHUNK = 100  # weight draws per vectorised block (bounds memory at width 256, depth 3)


def draws_forward(
    net: torch.nn.Module,
    mu: dict[str, Tensor],
    sigma: dict[str, Tensor],
    family: families.Family,
    x: Tensor,
    samples: int,
    seed: int,
) -> Tensor:
    """Outputs [S, B, C] of `samples` weight draws theta = mu + sigma z, z ~ family."""
    gen = torch.Generator().manual_seed(seed)
    net = net.eval()
    blocks = []
    for start in range(0, samples, CHUNK):
        n = min(CHUNK, samples - start)
        draws = {k: mu[k] + sigma[k] * family.sample((n, *v.shape), gen) for k, v in mu.items()}
        blocks.append(torch.vmap(lambda p: torch.func.functional_call(net, p, (x,)))(draws))
    return torch.cat(blocks)


def predictive_sets(
    net: torch.nn.Module,
    mu: dict[str, Tensor],
    sigma: dict[str, Tensor],
    x: Tensor,
    samples: int,
    deploy: tuple[str, ...],
) -> dict[str, Tensor]:
    """Outputs under the Gaussian, a second independent Gaussian ("floor") and each family."""
    sets = {
        "gaussian": draws_forward(net, mu, sigma, families.get("gaussian"), x, samples, 1),
        "floor": draws_forward(net, mu, sigma, families.get("gaussian"), x, samples, 2),
    }
    for fam in deploy:
        sets[fam] = draws_forward(net, mu, sigma, families.get(fam), x, samples, 3)
    return sets


# ---------------------------------------------------------------- regression


def train_regression(
    width: int, depth: int, family: str, steps: int, seed: int, noise_std: float
) -> tuple[torch.nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """Full-batch ELBO (Gaussian likelihood with the data's noise std, prior N(0, 1))."""
    data = Regression1D().load(Regression1DConfig(noise_std=noise_std), seed)
    factory = MLP().factory(MLPConfig(hidden=[width] * depth, dropout=0.0), data.spec)
    torch.manual_seed(seed)
    q = MeanField(factory(), init_sigma=1e-2, family=families.get(family))
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    x, y = data.train
    for _ in range(steps):
        opt.zero_grad()
        nll = 0.5 * ((q(x, local_reparam=False) - y) ** 2).mean() / noise_std**2
        loss = nll + q.kl(1.0) / len(x)
        loss.backward()
        opt.step()
    mu, sigma = q.moments()
    return q.net, {k: v.detach() for k, v in mu.items()}, {k: v.detach() for k, v in sigma.items()}


def compare(out_x: Tensor, out_g: Tensor, out_floor: Tensor) -> dict[str, float]:
    """Scalar outputs [S, P] of family X, Gaussian, and a second Gaussian draw.

    Energy distance has units of sqrt(output), so it is divided by the square root of the
    Gaussian predictive std at each input: widths whose predictives differ in spread then
    compare on one scale.
    """
    std = out_g.std(0).clamp_min(1e-12)
    root = std.sqrt()
    return {
        "hist_kl": divergence.histogram_kl(out_x, out_g).mean().item(),
        "energy": (divergence.energy_distance_1d(out_x, out_g) / root).mean().item(),
        "hist_kl_floor": divergence.histogram_kl(out_floor, out_g).mean().item(),
        "energy_floor": (divergence.energy_distance_1d(out_floor, out_g) / root).mean().item(),
        "pred_std": std.mean().item(),
        # location vs spread: a shape-dependent mean shift survives the CLT (see the report)
        "mean_shift": ((out_x.mean(0) - out_g.mean(0)).abs() / std).mean().item(),
        "mean_shift_floor": ((out_floor.mean(0) - out_g.mean(0)).abs() / std).mean().item(),
        "std_ratio": (out_x.std(0) / std).mean().item(),
    }


def effective_width(
    net: torch.nn.Module, mu: dict[str, Tensor], sigma: dict[str, Tensor], x: Tensor, samples: int
) -> float:
    """How many additive terms really carry the output's variance: (sum v)^2 / sum v^2 over
    the output layer's terms w_j h_j (one per last-hidden unit) and its bias, per input.

    The CLT argument needs many comparable terms; this says how many there are.
    """
    head = str(len(net) - 1)
    gen = torch.Generator().manual_seed(4)
    draws = {
        k: mu[k] + sigma[k] * torch.randn(samples, *v.shape, generator=gen) for k, v in mu.items()
    }
    body = net.eval()[:-1]
    h = torch.vmap(lambda p: torch.func.functional_call(body, p, (x,)))(
        {k: v for k, v in draws.items() if not k.startswith(head + ".")}
    )  # [S, B, H]
    terms = h * draws[f"{head}.weight"][:, :1, None, :].squeeze(1)  # output 0: [S, B, H]
    var = torch.cat([terms.var(0), draws[f"{head}.bias"][:, :1].var(0).expand(len(x), 1)], -1)
    return (var.sum(-1) ** 2 / (var**2).sum(-1).clamp_min(1e-30)).mean().item()


def regression_rows(args: argparse.Namespace) -> list[dict]:
    grid = torch.linspace(*DOMAIN, args.points)[:, None]
    rows = []
    for depth in args.depths:
        for width in args.widths:
            for train in ("gaussian", *DEVICE_FAMILIES):
                t0 = time.perf_counter()
                net, mu, sigma = train_regression(
                    width, depth, train, args.steps, args.seed, noise_std=0.1
                )
                deploy = DEVICE_FAMILIES if train == "gaussian" else (train,)
                sets = predictive_sets(net, mu, sigma, grid, args.samples, deploy)
                sets = {k: v[..., 0] for k, v in sets.items()}
                n_eff = effective_width(net, mu, sigma, grid, 500)
                for fam in deploy:
                    row = {"task": "regression", "depth": depth, "width": width}
                    row |= {"train": train, "deploy": fam}
                    row |= compare(sets[fam], sets["gaussian"], sets["floor"])
                    row["n_eff"] = n_eff
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------- classification


def classification_rows(args: argparse.Namespace) -> list[dict]:
    """Gaussian-trained SVI posteriors (runner cache) deployed on each device family."""
    config.register(registry.default())
    reg = registry.default()
    rows = []
    for width in args.widths:
        overrides = [
            "+experiment=weight_shape",
            f"model.hidden=[{width}]",
            f"seed={args.seed}",
            f"cache_dir={args.cache_dir}",
            *args.override,
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        t0 = time.perf_counter()
        job = runner.prepare(cfg, reg)
        post, cached = runner.fit_or_load(job, cfg.method)
        x = job.data.test[0]
        net = job.net_factory()
        mu = {k: post.tensors[f"mu.{k}"] for k, _ in net.named_parameters()}
        sigma = {k: post.tensors[f"sigma.{k}"] for k, _ in net.named_parameters()}

        sets = predictive_sets(net, mu, sigma, x, args.cls_samples, DEVICE_FAMILIES)
        sets = {k: F.softmax(v, -1) for k, v in sets.items()}
        gauss, floor = sets["gaussian"], sets["floor"]
        for fam in DEVICE_FAMILIES:
            px = sets[fam]
            row = {"task": "classification", "depth": 1, "width": width}
            row |= {"train": "gaussian", "deploy": fam, "cached": cached}
            row |= {
                "hist_kl": divergence.mean_prob_kl(px, gauss).mean().item(),
                "energy": divergence.energy_distance(px, gauss).mean().item(),
                "hist_kl_floor": divergence.mean_prob_kl(floor, gauss).mean().item(),
                "energy_floor": divergence.energy_distance(floor, gauss).mean().item(),
                "accuracy_x": (px.mean(0).argmax(-1) == job.data.test[1]).float().mean().item(),
                "accuracy_gauss": (gauss.mean(0).argmax(-1) == job.data.test[1])
                .float()
                .mean()
                .item(),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------- report


def first_width_at_floor(rows: list[dict], key: str, factor: float) -> int | None:
    """Smallest width from which the divergence stays within `factor` x its floor."""
    rows = sorted(rows, key=lambda r: r["width"])
    for i, r in enumerate(rows):
        if all(s[key] <= factor * s[f"{key}_floor"] for s in rows[i:]):
            return r["width"]
    return None


def plot(rows: list[dict], path: Path) -> None:
    """Divergence/floor vs width: top row KL (histogram or mean-probability), bottom energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("regression", d) for d in sorted({r["depth"] for r in rows if r["task"] == "regression"})
    ]
    panels += [("classification", 1)] if any(r["task"] == "classification" for r in rows) else []
    fig, axes = plt.subplots(2, len(panels), figsize=(4.0 * len(panels), 6.4), squeeze=False)
    for col, (task, depth) in enumerate(panels):
        sel = [r for r in rows if r["task"] == task and r["depth"] == depth]
        for row, (key, label) in enumerate(
            [("hist_kl", "KL / floor"), ("energy", "energy distance / floor")]
        ):
            ax = axes[row][col]
            for train, deploy in sorted({(r["train"], r["deploy"]) for r in sel}):
                pts = sorted(
                    (r["width"], r[key] / r[f"{key}_floor"])
                    for r in sel
                    if (r["train"], r["deploy"]) == (train, deploy)
                )
                name = f"{train}->{deploy}"
                ax.plot(*zip(*pts, strict=True), marker="o", label=name, color=COLOURS[name])
            ax.axhline(1.0, color="k", ls="--", lw=1, label="Gaussian vs Gaussian (floor)")
            ax.set(xscale="log", yscale="log", xlabel="hidden width", ylabel=label)
            ax.set_title(f"{task}, depth {depth}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    head = (
        "| task | depth | width | train -> deploy | hist/prob KL | KL floor | energy "
        "| energy floor | pred std, n_eff / acc X vs Gauss |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        extra = (
            f"{r['pred_std']:.3f}, {r.get('n_eff', float('nan')):.1f}"
            if "pred_std" in r
            else f"{r['accuracy_x']:.3f} vs {r['accuracy_gauss']:.3f}"
        )
        lines.append(
            f"| {r['task']} | {r['depth']} | {r['width']} | {r['train']} -> {r['deploy']} | "
            f"{r['hist_kl']:.3g} | {r['hist_kl_floor']:.3g} | {r['energy']:.3g} | "
            f"{r['energy_floor']:.3g} | {extra} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    ap.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    ap.add_argument("--steps", type=int, default=1500, help="regression ELBO steps")
    ap.add_argument("--samples", type=int, default=2000, help="regression weight draws")
    ap.add_argument("--points", type=int, default=64, help="regression test inputs")
    ap.add_argument(
        "--override", nargs="*", default=[], help="extra Hydra overrides for classification"
    )
    ap.add_argument("--cls-samples", type=int, default=200)
    ap.add_argument("--cache-dir", default=str(ROOT / "results" / "cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only",
        choices=["regression", "classification"],
        help="run one task; the other task's rows are kept from an earlier --out JSON",
    )
    ap.add_argument("--out", default=str(ROOT / "results" / "weight_shape_divergence"))
    ap.add_argument("--quick", action="store_true", help="tiny settings, writes nothing")
    ap.add_argument("--report-only", action="store_true", help="re-render from --out JSON")
    args = ap.parse_args()
    if args.quick:
        args.widths, args.depths, args.steps, args.samples = [1, 64], [1], 200, 500
        args.override, args.cls_samples = (
            ["method.fit.epochs=3", "reference.method.fit.epochs=3"],
            50,
        )
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.report_only:
        report(json.loads(out.with_suffix(".json").read_text())["rows"], out)
        return
    rows = []
    if args.only and out.with_suffix(".json").exists():
        kept = json.loads(out.with_suffix(".json").read_text())["rows"]
        rows = [r for r in kept if r["task"] != args.only]
    if args.only != "classification":
        rows += regression_rows(args)
    if args.only != "regression":
        rows += classification_rows(args)
    if args.quick:
        return
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    report(rows, out)


def summary(rows: list[dict]) -> list[str]:
    """Per (task, train -> deploy, depth): the width from which each divergence stays near
    its floor (histogram/probability KL within 1.5x, energy within 2x), or "never"."""
    lines = []
    for task in ("regression", "classification"):
        pairs = sorted({(r["train"], r["deploy"]) for r in rows if r["task"] == task})
        for train, deploy in pairs:
            for depth in sorted({r["depth"] for r in rows if r["task"] == task}):
                key = (task, train, deploy, depth)
                sel = [r for r in rows if (r["task"], r["train"], r["deploy"], r["depth"]) == key]
                if not sel:
                    continue
                kl, energy = (
                    first_width_at_floor(sel, k, f) for k, f in (("hist_kl", 1.5), ("energy", 2.0))
                )
                cells = [task, depth, f"{train} -> {deploy}", kl or "never", energy or "never"]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
    head = (
        "| task | depth | train -> deploy | KL at floor from width | energy at floor from width |"
    )
    return [head, "|" + "---|" * 5, *lines]


def report(rows: list[dict], out: Path) -> None:
    plot(rows, out.with_suffix(".png"))
    text = table(rows) + "\n\n" + "\n".join(summary(rows)) + "\n"
    Path(f"{out}_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
