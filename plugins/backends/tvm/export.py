"""A deployable artefact for one batch size: the compiled library and a standalone runner.

`predict.py` needs numpy and the TVM runtime only (the aarch64 wheels on a board, with
`TVM_USE_RUNTIME_LIB=1` and no compiler library): no torch, no harness. Random draws of a
sampling program (weight noise, dropout masks) are listed in the manifest. Built with
`backend.noise=philox` the library draws them itself and the runner passes a fresh key and
counter from numpy per call; with `torch` the runner samples them with numpy per call, as
the harness samples them with torch. Moments need no draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from harness.api import InferenceProgram

LIBRARY = "model.so"
RUNNER = "predict.py"

RUNNER_SOURCE = '''"""Predict with uncertainty from the library beside this file (numpy, TVM).

    python predict.py inputs.npy [outputs.npz] [--seed N]

inputs.npy: float32 batch shaped as manifest.json's input_shape. Writes (or prints) probs
[B, C], entropy [B] (total predictive entropy), and for moments the logit mean and
variance, for samples the expected entropy (aleatoric) and mutual information (epistemic).
"""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402

HERE = Path(__file__).resolve().parent
MANIFEST = json.loads((HERE / "manifest.json").read_text())


def load():
    lib = tvm.runtime.load_module(str(HERE / MANIFEST["library"]))
    return VirtualMachine(lib, tvm.cpu())


def draws(rng):
    if MANIFEST["noise"] == "philox":  # drawn inside the library: its key and counter
        return [rng.integers(-(2**31), 2**31, size=4, dtype=np.int32)]
    out = []
    for d in MANIFEST["draws"]:
        shape, dist = tuple(d["shape"]), d["dist"]
        if dist == "normal":
            out.append(rng.standard_normal(shape, dtype=np.float32))
        elif dist == "uniform":
            out.append(rng.random(shape, dtype=np.float32))
        else:  # bernoulli(p)
            p = float(dist[len("bernoulli(") : -1])
            out.append((rng.random(shape) < p).astype(np.float32))
    return out


def softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def entropy(p, axis=-1):
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=axis)


def predict(vm, x, rng=None):
    """Probabilities and uncertainty of one batch (shape and dtype as in the manifest)."""
    x = np.ascontiguousarray(x, dtype=MANIFEST["input_dtype"])
    if list(x.shape) != MANIFEST["input_shape"]:
        raise SystemExit(f"input shape {list(x.shape)} != manifest {MANIFEST['input_shape']}")
    rng = rng or np.random.default_rng()
    args = [tvm.runtime.tensor(a) for a in [x, *draws(rng)]]
    out = vm["main"](*args)
    if MANIFEST["output_kind"] == "moments":
        mean, var = out[0].numpy(), out[1].numpy()
        probs = softmax(mean / np.sqrt(1 + math.pi / 8 * np.clip(var, 0, None)))
        return {"probs": probs, "entropy": entropy(probs), "mean": mean, "variance": var}
    logits = out.numpy()  # [S, B, C]
    p = softmax(logits)
    probs = p.mean(0)
    total, aleatoric = entropy(probs), entropy(p).mean(0)
    return {
        "probs": probs,
        "entropy": total,
        "aleatoric": aleatoric,
        "epistemic": np.clip(total - aleatoric, 0, None),
    }


def main(argv):
    import argparse

    parser = argparse.ArgumentParser(description="predict with uncertainty")
    parser.add_argument("inputs", help=".npy batch, shape and dtype as in manifest.json")
    parser.add_argument("outputs", nargs="?", help=".npz to write (default: print)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random draws")
    args = parser.parse_args(argv)
    result = predict(load(), np.load(args.inputs), np.random.default_rng(args.seed))
    if args.outputs:
        np.savez(args.outputs, **result)
    else:
        for k, v in result.items():
            print(k, np.array2string(v, precision=4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
'''


def write(ex: Any, noise: Any, target: Any, out: Path, cc: str | None) -> dict[str, Any]:
    """Library, runner and the backend's part of the manifest (the runner adds the rest)."""
    out.mkdir(parents=True, exist_ok=True)
    if cc is None:
        ex.export_library(str(out / LIBRARY))
    else:
        ex.export_library(str(out / LIBRARY), cc=cc)
    (out / RUNNER).write_text(RUNNER_SOURCE)
    return {
        "library": LIBRARY,
        "runner": RUNNER,
        "target": str(target),
        "draws": [{"shape": list(d.shape), "dist": d.dist} for d in noise.draws],
        "noise": "philox" if noise.in_graph else "fed",
    }


def build(backend: Any, program: InferenceProgram, example: Tensor, cfg: Any):
    """The executable for the example's batch size, built as `compile` builds it."""
    from plugins.backends.tvm import tuning
    from plugins.backends.tvm.backend import choose_path

    tuning.check_mode(cfg.tune)
    path, target = choose_path(program, cfg.path), backend.target(cfg)
    ex, _, noise = backend.build_module(program.eval(), example, path, target, cfg)
    return ex, noise, target
