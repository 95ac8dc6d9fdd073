"""Posteriors as data: saved without pickle, cached by training config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness import cache
from harness.api import Posterior


def _posterior(value: float) -> Posterior:
    return Posterior("toy", {"net.w": torch.full((2, 3), value)}, {"note": "x"})


def test_roundtrip_is_safetensors_and_json(tmp_path: Path) -> None:
    post = _posterior(1.5)
    post.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "meta.json",
        "tensors.safetensors",
    ]
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["method"] == "toy"
    back = Posterior.load(tmp_path / "p")
    assert torch.equal(back.tensors["net.w"], post.tensors["net.w"])
    assert back.meta == {"note": "x"}
    assert list(back.subset("net")) == ["w"]
    assert torch.equal(back.subset("net")["w"], post.tensors["net.w"])


def test_fit_once_then_load(tmp_path: Path) -> None:
    calls: list[int] = []

    def fit() -> Posterior:
        calls.append(1)
        return _posterior(float(len(calls)))

    parts = {"method": "toy", "fit": {"epochs": 3}, "seed": 0}
    first, cached1 = cache.fit_or_load(tmp_path, "toy", parts, fit)
    second, cached2 = cache.fit_or_load(tmp_path, "toy", dict(parts), fit)
    assert (cached1, cached2) == (False, True)
    assert len(calls) == 1
    assert torch.equal(first.tensors["net.w"], second.tensors["net.w"])
    _, cached3 = cache.fit_or_load(tmp_path, "toy", {**parts, "seed": 1}, fit)
    assert not cached3 and len(calls) == 2
    assert not list(tmp_path.glob(".staging-*"))


def test_key_ignores_order() -> None:
    assert cache.key({"a": 1, "b": {"c": 2}}) == cache.key({"b": {"c": 2}, "a": 1})
    assert cache.key({"a": 1}) != cache.key({"a": 2})
