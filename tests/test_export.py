"""`bnn-harness export`: the artefact's standalone runner (numpy + TVM runtime) run inside the
emulated aarch64 environment agrees with the same runner on this host, and with PyTorch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from arm_sim_support import arm_board  # noqa: F401  (session fixture)
from omegaconf import DictConfig

from harness import cli, registry, runner


def run_runner(cmd: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("method=pfp",), ("method=mc_dropout", "method.samples=4")])
def test_exported_runner_on_aarch64_matches_the_host(
    arm_board,  # noqa: F811
    make_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    overrides: tuple[str, ...],
) -> None:
    arm_dir, host_dir = tmp_path / "arm", tmp_path / "host"
    (arm,) = runner.export(
        make_cfg(*overrides, "backend=tvm_arm", "batch_size=3"), registry.default(), arm_dir
    )
    (host,) = runner.export(
        make_cfg(*overrides, "backend=tvm", "batch_size=3"), registry.default(), host_dir
    )
    manifest = json.loads((arm / "manifest.json").read_text())
    assert manifest["input_shape"][0] == 3 and manifest["input_dtype"] == "float32"
    assert (
        manifest["posterior_sha256"]
        == json.loads((host / "manifest.json").read_text())["posterior_sha256"]
    )
    assert "aarch64" in manifest["target"] and (arm / "model.so").exists()
    x = np.random.default_rng(0).standard_normal(manifest["input_shape"]).astype("float32")
    np.save(tmp_path / "x.npy", x)

    cmd, env = arm_board.python_command(
        arm / "predict.py", str(tmp_path / "x.npy"), str(tmp_path / "arm.npz"), "--seed", "5"
    )
    run_runner(cmd, env)
    run_runner(
        [
            sys.executable,
            str(host / "predict.py"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "host.npz"),
            "--seed",
            "5",
        ]
    )
    on_arm, on_host = np.load(tmp_path / "arm.npz"), np.load(tmp_path / "host.npz")
    assert set(on_arm.files) == set(on_host.files) and "entropy" in on_arm.files
    for key in on_arm.files:
        np.testing.assert_allclose(on_arm[key], on_host[key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(on_arm["probs"].sum(-1), 1.0, rtol=1e-5)
    if manifest["output_kind"] == "moments":  # against the program in PyTorch
        job = runner.prepare(make_cfg(*overrides), registry.default())
        posterior, _ = runner.fit_or_load(job, job.cfg.method)
        mean, var = runner.make_program(job, posterior, job.cfg.method)(torch.from_numpy(x))
        np.testing.assert_allclose(on_arm["mean"], mean.detach().numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(on_arm["variance"], var.detach().numpy(), rtol=1e-3, atol=1e-4)
        probs = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1).detach().numpy()
        np.testing.assert_allclose(on_arm["probs"], probs, rtol=1e-3, atol=1e-4)
    else:
        assert on_arm["probs"].shape == (3, 10) and (on_arm["epistemic"] >= 0).all()


def test_export_needs_a_backend_with_an_export_hook(tmp_path: Path, capsys) -> None:
    code = cli.main(
        [
            "export",
            "--out",
            str(tmp_path / "out"),
            "backend=torch",
            "method=pfp",
            f"cache_dir={tmp_path}/cache",
        ]
    )
    assert code == 1
    assert "cannot export an artefact" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
