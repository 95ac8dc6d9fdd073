"""`method=imported`: Pyro and bayesian-torch checkpoints, trained and saved here the way
their users save them, read into the mu./sigma. posterior without running code from them.

The check that matters: PFP on the imported posterior equals PFP on the same weights
entered by hand (read from the live Pyro param store / bayesian-torch modules).
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from harness import registry, runner
from harness.api import DataSpec, HarnessError, Posterior
from plugins.methods.imported import Imported, ImportedConfig
from plugins.methods.pfp import make_program
from plugins.models import MLP, MLPConfig

SPEC = DataSpec((1, 2, 2), 3)  # 4 inputs, 3 classes
FACTORY = MLP().factory(MLPConfig(hidden=[8], dropout=0.0), SPEC)  # 1.weight ... 4.bias


def cfg(path: Path, **options) -> object:
    node = OmegaConf.structured(ImportedConfig(path=str(path), **options))
    Imported().check(node)
    return node


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def by_hand(mu: dict, sigma: dict) -> Posterior:
    tensors = {f"mu.{k}": v.detach().clone() for k, v in mu.items()}
    return Posterior("svi", tensors | {f"sigma.{k}": v.detach().clone() for k, v in sigma.items()})


def pfp(post: Posterior) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(5, *SPEC.input_shape, generator=torch.Generator().manual_seed(3))
    return make_program(post, FACTORY)(x)


def pyro_checkpoint(tmp_path: Path) -> tuple[Path, Posterior]:
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.nn import PyroModule, PyroSample

    class Net(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = PyroModule[nn.Linear](4, 8)
            self.fc2 = PyroModule[nn.Linear](8, 3)
            for layer, (o, i) in ((self.fc1, (8, 4)), (self.fc2, (3, 8))):
                layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([o, i]).to_event(2))
                layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([o]).to_event(1))

        def forward(self, x, y=None):
            logits = self.fc2(torch.relu(self.fc1(x)))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
            return logits

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = Net()
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    x, y = data()
    for _ in range(30):
        svi.step(x, y)
    path = tmp_path / "pyro.pt"
    torch.save(pyro.get_param_store().get_state(), path)
    # By hand: the guide's own constrained values, in our module paths.
    names = {"fc1": "1", "fc2": "4"}
    mu, sigma = {}, {}
    for layer, ours in names.items():
        for p in ("weight", "bias"):
            mu[f"{ours}.{p}"] = pyro.param(f"AutoNormal.locs.{layer}.{p}")
            sigma[f"{ours}.{p}"] = pyro.param(f"AutoNormal.scales.{layer}.{p}")
    return path, by_hand(mu, sigma)


def test_pyro_autonormal_imports_to_the_same_pfp(tmp_path: Path) -> None:
    path, hand = pyro_checkpoint(tmp_path)
    post = Imported().fit(FACTORY, None, cfg(path))
    assert post.meta["matched_by"] == "order" and post.meta["scale_param"] == "std"
    assert set(post.tensors) == set(hand.tensors)
    for key, value in hand.tensors.items():
        torch.testing.assert_close(post.tensors[key], value)
    mean, var = pfp(post)
    ref_mean, ref_var = pfp(hand)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    assert var.min() > 0  # the scales were read, not dropped
    # variance_scale and the log-variance reading of the same numbers.
    scaled = Imported().fit(FACTORY, None, cfg(path, variance_scale=4.0))
    torch.testing.assert_close(scaled.tensors["sigma.1.weight"], 2 * hand.tensors["sigma.1.weight"])
    logvar = Imported().fit(FACTORY, None, cfg(path, scale_param="log_variance"))
    expected = (0.5 * hand.tensors["sigma.1.weight"]).exp()
    torch.testing.assert_close(logvar.tensors["sigma.1.weight"], expected)


def test_bayesian_torch_imports_to_the_same_pfp(tmp_path: Path) -> None:
    pytest.importorskip("bayesian_torch")
    from bayesian_torch.layers import LinearReparameterization

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = LinearReparameterization(4, 8)
            self.fc2 = LinearReparameterization(8, 3)

        def forward(self, x):
            h, kl1 = self.fc1(x)
            out, kl2 = self.fc2(F.relu(h))
            return out, kl1 + kl2

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = data()
    for _ in range(30):
        out, kl = model(x)
        loss = F.cross_entropy(out, y) + kl / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "bt.pt"
    torch.save(model.state_dict(), path)
    mu, sigma = {}, {}
    for layer, ours in ((model.fc1, "1"), (model.fc2, "4")):
        mu[f"{ours}.weight"], mu[f"{ours}.bias"] = layer.mu_weight, layer.mu_bias
        sigma[f"{ours}.weight"] = torch.log1p(torch.exp(layer.rho_weight))
        sigma[f"{ours}.bias"] = torch.log1p(torch.exp(layer.rho_bias))
    hand = by_hand(mu, sigma)
    post = Imported().fit(FACTORY, None, cfg(path, format="bayesian_torch"))
    mean, var = pfp(post)
    ref_mean, ref_var = pfp(hand)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_safetensors_by_module_path_and_mismatch_names_the_layer(tmp_path: Path) -> None:
    net = FACTORY()
    tensors = {f"mu.{k}": v.detach() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": 0.1 * torch.ones_like(v) for k, v in net.named_parameters()}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    post = Imported().fit(FACTORY, None, cfg(tmp_path / "ok.safetensors", format="safetensors"))
    assert post.meta["matched_by"] == "path"
    torch.testing.assert_close(pfp(post), pfp(Posterior("svi", tensors)))
    wrong = MLP().factory(MLPConfig(hidden=[6], dropout=0.0), SPEC)
    with pytest.raises(HarnessError, match=r"parameter '1\.weight' is \[8, 4\] in the checkpoint"):
        Imported().fit(wrong, None, cfg(tmp_path / "ok.safetensors", format="safetensors"))
    by_order = cfg(tmp_path / "ok.safetensors", format="safetensors", match="order")
    with pytest.raises(HarnessError, match=r"parameter 0 '1\.weight' is \[6, 4\]"):
        Imported().fit(wrong, None, by_order)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    Evil.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"params": {"x": Evil()}, "constraints": {}}, path)
    with pytest.raises(HarnessError, match=r"asks for the global '(posix|os)\.system'"):
        Imported().fit(FACTORY, None, cfg(path))
    raw = tmp_path / "evil.pkl"  # a bare pickle, not a torch zip
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(HarnessError, match=r"asks for the global .(posix|os)\.system."):
        Imported().fit(FACTORY, None, cfg(raw))
    assert not marker.exists()


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="set the checkpoint's path"):
        Imported().check(OmegaConf.structured(ImportedConfig()))
    with pytest.raises(HarnessError, match="no checkpoint file"):
        cfg(tmp_path / "nope.pt")
    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(HarnessError, match="format='onnx' is not valid; valid: pyro"):
        cfg(tmp_path / "f.pt", format="onnx")
    with pytest.raises(HarnessError, match="scale_param applies to format=pyro only"):
        cfg(tmp_path / "f.pt", format="bayesian_torch", scale_param="log_variance")


def test_pfp_on_an_imported_checkpoint_end_to_end(make_cfg, tmp_path: Path) -> None:
    """The issue's command through Hydra and the runner; a changed file is imported again."""
    reg = registry.default()
    probe = make_cfg("dataset=dirty_digits", "model=mlp")
    data_ = reg.get("dataset", "dirty_digits").load(probe.dataset, 0)
    net = reg.get("model", "mlp").factory(probe.model, data_.spec)()
    tensors = {f"mu.{k}": v.detach() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": 0.01 * torch.ones_like(v) for k, v in net.named_parameters()}
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(tensors, str(ckpt))
    common = [
        "method=pfp",
        "method@method.base=imported",
        f"method.base.path={ckpt}",
        "method.base.format=safetensors",
        "method.base.model=mlp",
        "dataset=dirty_digits",
    ]
    first = runner.run(make_cfg(*common), reg)
    assert math.isfinite(first["cal/nll"])
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("imp"))
    assert len(entries) == 1
    save_file({k: 2 * v for k, v in tensors.items()}, str(ckpt))
    runner.run(make_cfg(*common), reg)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("imp"))
    assert len(entries) == 2  # the sha256 is in the key
    with pytest.raises(HarnessError, match="the job's model is 'lenet5'"):
        runner.run(make_cfg(*common, "model=lenet5"), reg)
