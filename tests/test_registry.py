"""Discovery through entry points, clear errors, and isolation of broken plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness import api, cli, registry
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
    "backend": {"torch", "torch_compile", "tvm", "tvm_arm", "onnxruntime"},
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
    assert "deterministic, ensemble, imported, laplace, linearised, mc_dropout, pfp, svi" in message


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

                def fit(self, net_factory, data, cfg, base):
                    raise NotImplementedError

                def program(self, posterior, net_factory, cfg):
                    raise NotImplementedError

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


def _package(root: Path, dist: str, modules: dict[str, str], entries: dict[str, str]) -> None:
    """A fake installed distribution: modules on the path and its entry points."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[bnn_harness_contract]\n{lines}")


HEADER = """
import pluggy
hookimpl = pluggy.HookimplMarker("bnn_harness")
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("contract_"):
            sys.modules.pop(name)


def test_plugin_missing_a_required_member_is_reported_not_loaded(site: Path) -> None:
    _package(
        site,
        "half-backend",
        {
            "contract_half": HEADER
            + """
class NoCompile:
    name = "nocompile"

class Whole:
    name = "whole"

    def compile(self, program, example, cfg):
        return program

@hookimpl
def bnn_harness_backends():
    return [NoCompile(), Whole()]
"""
        },
        {"half": "contract_half"},
    )
    reg = registry.build(group="bnn_harness_contract")
    assert set(reg.plugins("backend")) == {"whole"}
    [(entry, problem)] = reg.failures.items()
    assert entry == "backend 'nocompile' from half [half-backend]"
    assert "missing required member(s) compile of harness.api.Backend" in problem


def test_optional_members_get_their_documented_defaults(site: Path) -> None:
    """A plugin that inherits nothing still meets the whole Protocol once loaded."""
    _package(
        site,
        "bare",
        {
            "contract_bare": HEADER
            + """
class Bare:
    name = "bare"
    base = "deterministic"

    def fit(self, net_factory, data, cfg, base):
        return base

    def program(self, posterior, net_factory, cfg):
        return None

@hookimpl
def bnn_harness_methods():
    return [Bare()]
"""
        },
        {"bare": "contract_bare"},
    )
    method = registry.build(group="bnn_harness_contract").get("method", "bare")
    assert isinstance(method, api.Method)
    assert method.fit_options == ()
    assert method.check(object()) is None
    cfg = OmegaConf.create({"name": "bare"})
    assert method.base_config(cfg) == ("deterministic", cfg)
    node = OmegaConf.create({"name": "svi"})
    assert method.base_config(OmegaConf.create({"name": "bare", "base": node}))[0] == "svi"


def test_duplicate_names_are_an_error_naming_both_packages(site: Path) -> None:
    source = (
        HEADER
        + """
class Twin:
    name = "twin"

    def load(self, cfg, seed):
        raise NotImplementedError

@hookimpl
def bnn_harness_datasets():
    return [Twin()]
"""
    )
    _package(site, "first-pkg", {"contract_one": source}, {"one": "contract_one"})
    _package(site, "second-pkg", {"contract_two": source}, {"two": "contract_two"})
    reg = registry.build(group="bnn_harness_contract")
    with pytest.raises(HarnessError) as err:
        reg.get("dataset", "twin")
    message = str(err.value)
    assert "two datasets are named 'twin'" in message
    assert "[first-pkg]" in message and "[second-pkg]" in message


def test_misspelled_hook_is_reported(site: Path) -> None:
    _package(
        site,
        "typo-pkg",
        {
            "contract_typo": HEADER
            + """
@hookimpl
def bnn_harness_method():  # the hook is bnn_harness_methods
    return []
"""
        },
        {"typo": "contract_typo"},
    )
    reg = registry.build(group="bnn_harness_contract")
    [(entry, problem)] = reg.failures.items()
    assert entry.startswith("typo (contract_typo)")
    assert "unknown hook 'bnn_harness_method'" in problem
    assert reg.plugins("method") == {}


def test_cli_lists_contract_failures(site: Path, capsys) -> None:
    _package(
        site,
        "half-model",
        {
            "contract_model": HEADER
            + """
class NoFactory:
    name = "nofactory"

@hookimpl
def bnn_harness_models():
    return [NoFactory()]
"""
        },
        {"half": "contract_model"},
    )
    assert cli.plugins(registry.build(group="bnn_harness_contract")) == 0
    out = capsys.readouterr().out
    assert "model 'nofactory' from half [half-model]" in out
    assert "missing required member(s) factory" in out


def test_builtins_meet_their_protocols() -> None:
    reg = registry.build()
    for kind, contract in api.CONTRACTS.items():
        for name, (plugin, _) in reg.plugins(kind).items():
            assert isinstance(plugin, contract.protocol), (kind, name)
