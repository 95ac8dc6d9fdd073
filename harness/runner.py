"""One job: the flow of DESIGN.md, one function per arrow.

`prepare` touches no store, so a bad config or unreadable data fails before any
MLflow run exists; `execute` runs inside the MLflow run and is recorded either way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from harness import cache, isolation, metrics, plots, timing, tracking
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
    """Every plugin the job will call exists and accepts its options, before anything runs.

    Bases are included (e.g. the deterministic network under MC dropout, a `base` node
    under linearised), so an option that would only fail after the base trained fails now.
    """
    nodes = [
        ("dataset", cfg.dataset),
        ("model", cfg.model),
        ("quantizer", cfg.quant),
        ("backend", cfg.backend),
        ("backend", cfg.reference.backend),
    ]
    for kind, node in nodes:
        registry.get(kind, node.name)
    for node in (cfg.method, cfg.reference.method):
        for name, method_cfg in method_chain(registry, node):
            if name == method_cfg.name:  # a base on a borrowed config: the owner checked it
                registry.get("method", name).check(method_cfg)
    for kind, node in nodes:
        registry.get(kind, node.name).check(node)


def method_chain(registry: Registry, method_cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """A method and the bases it starts from, as fit_or_load walks them."""
    chain, name, borrowed = [], method_cfg.name, False
    while True:
        method = registry.get("method", name)
        chain.append((name, method_cfg))
        found = fixed_base(method, method_cfg) if borrowed else base_of(method, method_cfg)
        if found is None:
            return chain
        if len(chain) > 16:
            names = " -> ".join(n for n, _ in chain[:4])
            raise HarnessError(f"method bases form a cycle: {names} -> ...")
        name, method_cfg = found
        borrowed = name != method_cfg.name


def check_timing(cfg: DictConfig) -> None:
    timing_cfg = cfg.timing
    if timing_cfg.rounds <= 0 or timing_cfg.warmup < 0 or not timing_cfg.min_block_s > 0:
        raise HarnessError(
            "timing needs rounds >= 1, warmup >= 0 and min_block_s > 0, got "
            f"rounds={timing_cfg.rounds}, warmup={timing_cfg.warmup}, "
            f"min_block_s={timing_cfg.min_block_s}"
        )


def load_data(registry: Registry, cfg: DictConfig) -> DataBundle:
    data = registry.get("dataset", cfg.dataset.name).load(cfg.dataset, cfg.seed)
    for split, (x, y) in data.splits().items():
        if len(x) == 0 or len(x) != len(y):
            raise HarnessError(f"dataset '{cfg.dataset.name}': split '{split}' is empty or ragged")
        require_finite(x, f"dataset '{cfg.dataset.name}' split '{split}'")
        if tuple(x.shape[1:]) != tuple(data.spec.input_shape):
            raise HarnessError(
                f"dataset '{cfg.dataset.name}': split '{split}' has inputs of shape "
                f"{tuple(x.shape[1:])}, the dataset declares {tuple(data.spec.input_shape)}"
            )
        # OOD sets carry no class (-1 is common); every labelled split must fit the head.
        if split in ("train", "val", "test", "ambiguous") and (
            y.min() < 0 or y.max() >= data.spec.num_classes
        ):
            raise HarnessError(
                f"dataset '{cfg.dataset.name}': split '{split}' has labels outside "
                f"0..{data.spec.num_classes - 1} (min {int(y.min())}, max {int(y.max())})"
            )
    return data


def prepare(cfg: DictConfig, registry: Registry) -> Job:
    batch_sizes(cfg)
    if cfg.eval_batch_size <= 0 or cfg.moment_samples <= 0:
        raise HarnessError("eval_batch_size and moment_samples must be positive")
    check_timing(cfg)
    check_plugins(registry, cfg)
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
    options = list(job.registry.get("method", name).fit_options)
    if options:
        key["options"] = OmegaConf.to_container(
            OmegaConf.masked_copy(method_cfg, options), resolve=True
        )
    return key


def base_of(method: Any, method_cfg: DictConfig) -> tuple[str, DictConfig] | None:
    """The posterior a method starts from and the config that trains it (`Method.base_config`)."""
    return method.base_config(method_cfg)


def fixed_base(method: Any, method_cfg: DictConfig) -> tuple[str, DictConfig] | None:
    return (method.base, method_cfg) if method.base else None


def fit_or_load(
    job: Job, method_cfg: DictConfig, name: str | None = None
) -> tuple[Posterior, bool]:
    """A method's posterior, fitting its base first; `name` set: a base on a borrowed config."""
    name = name or method_cfg.name
    method = job.registry.get("method", name)
    borrowed = name != method_cfg.name
    # A base trained on a borrowed config (its derived method's) takes only its own fixed
    # base: the borrowed config's `base_config` choices belong to the derived method.
    found = fixed_base(method, method_cfg) if borrowed else base_of(method, method_cfg)
    base = fit_or_load(job, found[1], found[0])[0] if found else None
    key = training_key(job, method_cfg, name)
    if found:
        key["base"] = training_key(job, found[1], found[0])

    def fit() -> Posterior:
        L.seed_everything(job.cfg.seed, verbose=False)
        return method.fit(job.net_factory, job.data, method_cfg, base)

    # The entry records the config that trained it; a method that declares no fit_options
    # is warned when a hit was trained with other option values (harness/cache.py says why).
    trained_with = OmegaConf.to_container(method_cfg, resolve=True)
    return cache.fit_or_load(
        Path(job.cfg.cache_dir),
        name,
        key,
        fit,
        trained_with,  # type: ignore[arg-type]
        check_drift=not borrowed and not cache.declares_fit_options(method),
    )


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


def compile_program(
    job: Job, program: InferenceProgram, backend_cfg: DictConfig
) -> tuple[Executable, float]:
    """The executable and the seconds `compile` took, timed here for every backend alike."""
    example = job.data.test[0][:1]
    backend = job.registry.get("backend", backend_cfg.name)
    start = time.perf_counter()
    exe = backend.compile(program, example, backend_cfg)
    return exe, time.perf_counter() - start


@contextmanager
def compiled(
    job: Job, program: InferenceProgram, backend_cfg: DictConfig
) -> Iterator[tuple[Executable, float]]:
    """compile_program, and the backend's `release` once the block is done with it."""
    exe, seconds = compile_program(job, program, backend_cfg)
    try:
        yield exe, seconds
    finally:
        job.registry.get("backend", backend_cfg.name).release(exe)


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
    # Both are timed under the candidate's thread settings (its backend may have set them),
    # whatever compiling the reference changed; the settings are logged with the timings.
    threads = isolation.ThreadSettings.current()
    ref_post, _ = fit_or_load(job, cfg.reference.method)
    ref_program = make_program(job, ref_post, cfg.reference.method)
    with compiled(job, ref_program, cfg.reference.backend) as (ref, _):
        threads.apply()
        tracking.log_params(threads.params())
        pool = job.data.test[0]

        def make_input(b: int) -> Tensor:
            return pool[torch.arange(b) % len(pool)]

        times = timing.compare(exe, ref, make_input, batch_sizes(cfg), cfg.timing)
        return apart_if_emulated(times, executable_tags(exe), executable_tags(ref))


def executable_tags(exe: Executable) -> dict[str, str]:
    """`describe()["tags"]`: what an executable says about where it ran (e.g. device=emulated)."""
    return {str(k): str(v) for k, v in (exe.describe().get("tags") or {}).items()}


def apart_if_emulated(
    times: dict[str, float], cand: dict[str, str], ref: dict[str, str]
) -> dict[str, float]:
    """An emulator's latency says nothing about the device it emulates: against a reference
    that is not emulated, it is logged as lat_emulated/... and no speedup is computed."""
    if cand.get("device") != "emulated" or ref.get("device") == "emulated":
        return times
    return {
        k.replace("lat/", "lat_emulated/", 1): v
        for k, v in times.items()
        if not k.startswith("speedup/")
    }


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
    with compiled(job, program, cfg.backend) as (exe, compile_s):
        device = executable_tags(exe)
        if device:
            tracking.with_retry(lambda: mlflow.set_tags(device))
        scores, preds = evaluate(job, exe, program.kind)
        times = time_against_reference(job, exe)
        info = exe.describe()
    results = (
        scores
        | times
        | {
            "fit/seconds": fit_s,
            "fit/cached": float(cached),
            "compile/seconds": compile_s,
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


def previous_run(cfg: DictConfig) -> str | None:
    """The FINISHED run this exact job already has, to skip it on resume."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return tracking.finished_run(cfg.tracking, tracking.config_hash(resolved))


def run(cfg: DictConfig, registry: Registry, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """One job; thread counts and the environment are restored afterwards, pass or fail."""
    with isolation.job_state():
        return _run(cfg, registry, tags)


def _run(cfg: DictConfig, registry: Registry, tags: dict[str, str] | None) -> dict[str, Any]:
    job = prepare(cfg, registry)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base_tags = {
        "config_hash": tracking.config_hash(resolved),
        "method": cfg.method.name,
        "backend": cfg.backend.name,
        "dataset": cfg.dataset.name,
        "quant": cfg.quant.name,
        "bits": str(32 if cfg.quant.name == "none" else cfg.quant.get("bits") or 32),
        "model": cfg.model.name,
    }
    with tracking.job_run(cfg.tracking, run_name(cfg), resolved, base_tags | (tags or {})):
        return execute(job)


def posterior_hash(posterior: Posterior) -> str:
    """sha256 of the posterior's tensors and metadata: which trained model an artefact holds."""
    h = hashlib.sha256(json.dumps([posterior.method, posterior.meta], sort_keys=True).encode())
    for name in sorted(posterior.tensors):
        h.update(name.encode())
        h.update(posterior.tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def export(cfg: DictConfig, registry: Registry, out: Path) -> list[Path]:
    """Deployable artefacts, one folder per batch size, through the backend's `export` hook."""
    job = prepare(cfg, registry)
    backend = registry.get("backend", cfg.backend.name)
    if not callable(getattr(backend, "export", None)):
        raise HarnessError(
            f"backend '{cfg.backend.name}' cannot export an artefact: use a backend with an "
            "export hook (backend=tvm_arm or backend=tvm)"
        )
    posterior, _ = fit_or_load(job, cfg.method)
    posterior, _ = quantize(job, posterior)
    program = make_program(job, posterior, cfg.method)
    pool = job.data.test[0]
    common = {
        "method": cfg.method.name,
        "backend": cfg.backend.name,
        "output_kind": program.kind,
        "posterior_sha256": posterior_hash(posterior),
        "harness_version": _version(),
    }
    written = []
    for b in batch_sizes(cfg):
        example = pool[torch.arange(b) % len(pool)]
        folder = Path(out) / f"b{b}"
        folder.mkdir(parents=True, exist_ok=True)
        entries = backend.export(program, example, cfg.backend, folder)
        manifest = common | {
            "batch_size": b,
            "input_shape": list(example.shape),
            "input_dtype": str(example.dtype).removeprefix("torch."),
        }
        (folder / "manifest.json").write_text(json.dumps(manifest | entries, indent=2) + "\n")
        written.append(folder)
    return written


def _version() -> str:
    try:
        return importlib.metadata.version("bnn-harness")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
