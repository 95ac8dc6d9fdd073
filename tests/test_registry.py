"""Discovery through entry points, clear errors, and isolation of broken plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from harness import registry
from harness.api import HarnessError

BUILTINS = {
    "method": {
        "deterministic",
        "mc_dropout",
        "ensemble",
        "svi",
        "svi_qat",
        "pfp",
        "linearised",
        "laplace",
        "swag",
    },
    "backend": {"torch", "torch_compile", "tvm", "tvm_arm"},
    "dataset": {"dirty_digits", "mnist", "fashion_mnist", "dirty_mnist", "regression1d"},
    "model": {"mlp", "lenet5"},
    "quantizer": {"none", "vpq", "spq", "jq"},
}


def test_builtins_are_discovered_through_entry_points() -> None:
    reg = registry.build()
    for kind, names in BUILTINS.items():
        found = reg.plugins(kind)
        assert names <= set(found), kind
        assert all("bnn-harness" in source for _, source in found.values())
    assert not reg.failures


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(HarnessError) as err:
        registry.default().get("method", "bogus")
    message = str(err.value)
    assert "unknown method 'bogus'" in message
    assert "deterministic, ensemble, laplace, linearised, mc_dropout, pfp, svi" in message


def test_unknown_kind_lists_kinds() -> None:
    with pytest.raises(HarnessError, match="valid kinds: method, backend"):
        registry.default().get("sampler", "x")


def _fake_distribution(root: Path) -> None:
    """A site directory with one good and one broken plugin under a private group."""
    (root / "good_plugin.py").write_text(
        textwrap.dedent(
            """
            import pluggy
            hookimpl = pluggy.HookimplMarker("bnn_harness")

            class Echo:
                name = "echo"

            @hookimpl
            def bnn_harness_methods():
                return [Echo()]
            """
        )
    )
    (root / "broken_plugin.py").write_text("raise ImportError('missing dependency xyz')\n")
    info = root / "fake_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[bnn_harness_test]\ngood = good_plugin\nbroken = broken_plugin\n"
    )


def test_broken_plugin_is_reported_and_others_survive(tmp_path: Path, monkeypatch) -> None:
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = registry.build(group="bnn_harness_test")
    assert set(reg.plugins("method")) == {"echo"}
    assert reg.plugins("method")["echo"][1] == "good [fake-plugins]"
    [(entry, error)] = reg.failures.items()
    assert entry.startswith("broken")
    assert "missing dependency xyz" in error
    sys.modules.pop("good_plugin", None)
