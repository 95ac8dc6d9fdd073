"""One job: the flow of DESIGN.md, one function per arrow.

`prepare` touches no store, so a bad config or unreadable data fails before any
MLflow run exists; `execute` runs inside the MLflow run and is recorded either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from harness import cache, metrics, plots, timing, tracking
from harness.api import (
    DataBundle,
    Executable,
    HarnessError,
    InferenceProgram,
    MemoryAccount,
    NetFactory,
    Posterior,
    Predictive,
    require_finite,
)
from harness.registry import Registry


@dataclass
class Job:
    cfg: DictConfig
    registry: Registry
    data: DataBundle
    net_factory: NetFactory


def batch_sizes(cfg: DictConfig) -> list[int]:
    sizes = [cfg.batch_size] if cfg.batch_size is not None else list(cfg.batch_sizes)
    if not sizes or any(b <= 0 for b in sizes):
        raise HarnessError(f"batch sizes must be positive integers, got {sizes}")
    return sizes


def check_plugins(registry: Registry, cfg: DictConfig) -> None:
    for kind, node in [
        ("method", cfg.method),
        ("backend", cfg.backend),
        ("dataset", cfg.dataset),
        ("model", cfg.model),
        ("quantizer", cfg.quant),
        ("method", cfg.reference.method),
        ("backend", cfg.reference.backend),
    ]:
        registry.get(kind, node.name)


def load_data(registry: Registry, cfg: DictConfig) -> DataBundle:
    data = registry.get("dataset", cfg.dataset.name).load(cfg.dataset, cfg.seed)
    for split, (x, y) in data.splits().items():
        if len(x) == 0 or len(x) != len(y):
            raise HarnessError(f"dataset '{cfg.dataset.name}': split '{split}' is empty or ragged")
        require_finite(x, f"dataset '{cfg.dataset.name}' split '{split}'")
    return data


def prepare(cfg: DictConfig, registry: Registry) -> Job:
    batch_sizes(cfg)
    if cfg.eval_batch_size <= 0 or cfg.moment_samples <= 0:
        raise HarnessError("eval_batch_size and moment_samples must be positive")
    check_plugins(registry, cfg)
    quantizer = registry.get("quantizer", cfg.quant.name)
    if hasattr(quantizer, "check"):  # optional: reject bad options before anything trains
        quantizer.check(cfg.quant)
    data = load_data(registry, cfg)
    factory = registry.get("model", cfg.model.name).factory(cfg.model, data.spec)
    return Job(cfg, registry, data, factory)


def training_key(job: Job, method_cfg: DictConfig, name: str) -> dict[str, Any]:
    """Everything that changes a trained posterior, and nothing that does not."""
    cfg = job.cfg
    fit = method_cfg.get("fit")  # resolved in place: interpolations may point at the root
    key = {
        "method": name,
        "fit": {} if fit is None else OmegaConf.to_container(fit, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "seed": cfg.seed,
    }
    # Options outside `fit` that still change the posterior (e.g. Laplace's hessian), as
    # the method declares them; methods that declare none keep their old cache keys.
    options = list(getattr(job.registry.get("method", name), "fit_options", ()))
    if options:
        key["options"] = OmegaConf.to_container(
            OmegaConf.masked_copy(method_cfg, options), resolve=True
        )
    return key


def base_of(method: Any, method_cfg: DictConfig) -> tuple[str, DictConfig] | None:
    """The posterior a method starts from, and the config that trains it.

    A method may choose per config (`base_config`, e.g. PFP training its own posterior).
    Otherwise a `base` node in the config (a whole method config, e.g. linearised on
    Laplace) names it; failing that, the method's fixed `base` trains with the method's
    own config, so its `fit` settings, and its cache entry, match a plain run of the base.
    """
    if hasattr(method, "base_config"):
        node = method.base_config(method_cfg)
        return None if node is None else (node.name, node)
    if method_cfg.get("base") is not None:
        return method_cfg.base.name, method_cfg.base
    return fixed_base(method, method_cfg)


def fixed_base(method: Any, method_cfg: DictConfig) -> tuple[str, DictConfig] | None:
    return (method.base, method_cfg) if method.base else None


def fit_or_load(
    job: Job, method_cfg: DictConfig, name: str | None = None
) -> tuple[Posterior, bool]:
    """A method's posterior, fitting its base first; `name` set: a base on a borrowed config."""
    name = name or method_cfg.name
    method = job.registry.get("method", name)
    borrowed = name != method_cfg.name
    found = fixed_base(method, method_cfg) if borrowed else base_of(method, method_cfg)
    base = fit_or_load(job, found[1], found[0])[0] if found else None
    key = training_key(job, method_cfg, name)
    if found:
        key["base"] = training_key(job, found[1], found[0])

    def fit() -> Posterior:
        L.seed_everything(job.cfg.seed, verbose=False)
        return method.fit(job.net_factory, job.data, method_cfg, base)

    return cache.fit_or_load(Path(job.cfg.cache_dir), name, key, fit)


def quantize(job: Job, posterior: Posterior) -> tuple[Posterior, MemoryAccount]:
    return job.registry.get("quantizer", job.cfg.quant.name).apply(posterior, job.cfg.quant)


def make_program(job: Job, posterior: Posterior, method_cfg: DictConfig) -> InferenceProgram:
    program = job.registry.get("method", method_cfg.name).program(
        posterior, job.net_factory, method_cfg
    )
    if program.kind not in ("samples", "moments"):
        raise HarnessError(
            f"method '{method_cfg.name}' returned a program of unknown kind '{program.kind}'"
        )
    return program


def compile_program(job: Job, program: InferenceProgram, backend_cfg: DictConfig) -> Executable:
    example = job.data.test[0][:1]
    return job.registry.get("backend", backend_cfg.name).compile(program, example, backend_cfg)


def predict(exe: Executable, kind: str, x: Tensor, chunk: int, moment_samples: int) -> Predictive:
    """Predictions in chunks; the entropy split of moments is sampled outside the program."""
    parts = [
        metrics.to_predictive(exe(x[i : i + chunk]), kind, samples=moment_samples)
        for i in range(0, len(x), chunk)
    ]
    return metrics.concat(*parts)


def evaluate(
    job: Job, exe: Executable, kind: str
) -> tuple[dict[str, float], dict[str, Predictive]]:
    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    splits = {k: v for k, v in job.data.splits().items() if k not in ("train", "val")}
    preds = {
        k: predict(exe, kind, x, cfg.eval_batch_size, cfg.moment_samples)
        for k, (x, _) in splits.items()
    }
    labels = {k: y for k, (_, y) in splits.items()}
    return metrics.score_all(preds, labels, list(job.data.ood)), preds


def time_against_reference(job: Job, exe: Executable) -> dict[str, float]:
    cfg = job.cfg
    ref_post, _ = fit_or_load(job, cfg.reference.method)
    ref = compile_program(
        job, make_program(job, ref_post, cfg.reference.method), cfg.reference.backend
    )
    pool = job.data.test[0]

    def make_input(b: int) -> Tensor:
        return pool[torch.arange(b) % len(pool)]

    return timing.compare(exe, ref, make_input, batch_sizes(cfg), cfg.timing)


def run_name(cfg: DictConfig) -> str:
    bits = cfg.quant.get("bits")
    quant = "" if cfg.quant.name == "none" else f"-{cfg.quant.name}{bits or ''}"
    batch = "" if cfg.batch_size is None else f"-b{cfg.batch_size}"
    return f"{cfg.method.name}-{cfg.backend.name}{quant}{batch}"


def uncertainties(preds: dict[str, Predictive]) -> dict[str, Any]:
    """Per-sample entropy split of each evaluated split, for the report's histograms."""
    return {
        f"{split}.{part}": getattr(pred, part).detach().cpu().float().numpy()
        for split, pred in preds.items()
        for part in ("total", "aleatoric", "epistemic")
    }


def execute(job: Job) -> dict[str, Any]:
    cfg = job.cfg
    start = time.perf_counter()
    posterior, cached = fit_or_load(job, cfg.method)
    fit_s = time.perf_counter() - start
    posterior, memory = quantize(job, posterior)
    program = make_program(job, posterior, cfg.method)
    exe = compile_program(job, program, cfg.backend)
    scores, preds = evaluate(job, exe, program.kind)
    times = time_against_reference(job, exe)
    info = exe.describe()
    results = (
        scores
        | times
        | {
            "fit/seconds": fit_s,
            "fit/cached": float(cached),
            "compile/seconds": float(info.get("compile_s", 0.0)),
            "mem/param_bytes": float(memory.bytes_after),
            "mem/reduction_vs_fp32": memory.bytes_before / max(memory.bytes_after, 1),
        }
    )
    reliability = metrics.reliability_diagram(preds["test"].probs, job.data.test[1])
    tracking.log_results(
        results,
        {
            "results.json": {"metrics": results, "backend": info, "kind": program.kind},
            "reliability.json": reliability,
        },
        {"reliability.png": plots.reliability(reliability, run_name(cfg))},
        {"uncertainty.npz": uncertainties(preds)},
    )
    return results


def run(cfg: DictConfig, registry: Registry, tags: dict[str, str] | None = None) -> dict[str, Any]:
    job = prepare(cfg, registry)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base_tags = {
        "method": cfg.method.name,
        "backend": cfg.backend.name,
        "dataset": cfg.dataset.name,
        "quant": cfg.quant.name,
        "bits": str(32 if cfg.quant.name == "none" else cfg.quant.get("bits") or 32),
        "model": cfg.model.name,
    }
    with tracking.job_run(cfg.tracking, run_name(cfg), resolved, base_tags | (tags or {})):
        return execute(job)
