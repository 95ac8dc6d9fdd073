"""How many jobs of a sweep shared a machine, so a timing says whether it was clean.

A latency measured while other jobs ran on the same cores is not the latency of the
program; the speedup beside it is a ratio timed interleaved in one process, so it survives
better, but still moves with the load. Every job is tagged with its launcher and the most
jobs that could run at once on one machine (`concurrent_jobs`), and a preset that times
(`hydra.job.env_set.BNN_HARNESS_JOBS_PER_MACHINE: "1"`) gets the launcher's own setting
for one job per machine unless the command line chose one.

The launching process works this out before the launcher is built (Hydra instantiates it
after `on_multirun_start`) and hands it to the workers through the environment, as the
sweep's ids travel; a Ray worker refines it with the cluster it found.
"""

from __future__ import annotations

import math
import os

from omegaconf import DictConfig, OmegaConf, open_dict

LAUNCHER_ENV = "BNN_HARNESS_LAUNCHER"
CONCURRENT_ENV = "BNN_HARNESS_CONCURRENT_JOBS"
PER_MACHINE_ENV = "BNN_HARNESS_JOBS_PER_MACHINE"
ENV = (LAUNCHER_ENV, CONCURRENT_ENV)
# launcher choice -> (key under hydra.launcher, value) that runs one job per machine.
ONE_PER_MACHINE = {
    "joblib": ("n_jobs", 1),
    "slurm": ("additional_parameters.exclusive", True),
    "submitit_slurm": ("additional_parameters.exclusive", True),
}


def launcher_name(config: DictConfig) -> str:
    return str(OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher") or "basic")


def sweep_size(config: DictConfig) -> int | None:
    """Jobs in the sweep as the basic sweeper expands it (command line and preset)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    given = [f"{k}={v}" for k, v in params.items()]
    given += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception:  # another sweeper's syntax (ranges, intervals): unknown
        return None
    sizes: dict[str, int] = {}
    for override in parsed:
        if override.is_sweep_override():
            sizes[override.get_key_element()] = len(list(override.sweep_string_iterator()))
        else:  # a later plain value replaces an earlier sweep of the same key
            sizes[override.get_key_element()] = 1
    return math.prod(sizes.values())


def _joblib_limit(n_jobs: int) -> int:
    cpus = os.cpu_count() or 1
    return max(1, n_jobs if n_jobs > 0 else cpus + 1 + n_jobs)


def launcher_limit(config: DictConfig) -> int | None:
    """Most jobs the launcher runs at once on one machine; None where it sets no bound
    (submitit's local executor starts every job; Ray's depends on the cluster it joins)."""
    name = launcher_name(config)
    launcher = OmegaConf.select(config, "hydra.launcher") or {}
    target = str(launcher.get("_target_", ""))
    if name == "basic" or target.endswith("BasicLauncher"):
        return 1
    if "n_jobs" in launcher:
        return _joblib_limit(int(launcher.n_jobs))
    if target.endswith("SlurmLauncher"):
        extra = launcher.get("additional_parameters") or {}
        return 1 if extra.get("exclusive") else int(launcher.get("array_parallelism", 256))
    ray = launcher.get("ray")
    if ray is not None:
        cpus = (ray.get("init") or {}).get("num_cpus")
        need = (ray.get("remote") or {}).get("num_cpus") or 1
        return max(1, int(cpus // need)) if cpus else None
    return None


def one_per_machine(config: DictConfig) -> str | None:
    """Set the launcher's own knob for one job per machine when the preset asks for it and
    the command line left it alone; what was set, as an override, or None."""
    env_set = OmegaConf.select(config, "hydra.job.env_set") or {}
    if str(env_set.get(PER_MACHINE_ENV, "")) != "1":
        return None
    name = launcher_name(config)
    if name not in ONE_PER_MACHINE:
        return None
    key, value = ONE_PER_MACHINE[name]
    head = f"hydra.launcher.{key.split('.')[0]}"
    chosen = [str(o).split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.hydra]
    if any(c == head or c.startswith(head + ".") for c in chosen):
        return None
    with open_dict(config.hydra.launcher):
        OmegaConf.update(config.hydra.launcher, key, value, force_add=True)
    return f"hydra.launcher.{key}={value}"


def start(config: DictConfig) -> dict[str, str]:
    """In the launching process: the launcher and its concurrency, exported for the jobs."""
    limit, size = launcher_limit(config), sweep_size(config)
    known = [n for n in (limit, size) if n is not None]
    concurrent = min(known) if known else 1
    values = {LAUNCHER_ENV: launcher_name(config), CONCURRENT_ENV: str(concurrent)}
    os.environ.update(values)
    return values


def stop() -> None:
    for key in ENV:
        os.environ.pop(key, None)


def _ray_per_node() -> int | None:
    """Jobs one node of the Ray cluster this worker runs in can hold at once."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    from hydra.core.hydra_config import HydraConfig

    remote = OmegaConf.select(HydraConfig.get(), "launcher.ray.remote") or {}
    need = float(remote.get("num_cpus") or 1)
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max((int(c // need) for c in cpus), default=None) or None


def job_tags(launcher: str | None = None) -> dict[str, str]:
    """`launcher` and `concurrent_jobs` for a job: from the launching process, or 1 for a
    job run on its own."""
    name = os.environ.get(LAUNCHER_ENV) or launcher or "basic"
    concurrent = int(os.environ.get(CONCURRENT_ENV, "1"))
    if name.startswith("ray"):
        per_node = _ray_per_node()
        if per_node is not None:
            concurrent = min(concurrent, per_node)
    return {"launcher": name, "concurrent_jobs": str(concurrent)}
