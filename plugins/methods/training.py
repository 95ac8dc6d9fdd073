"""Lightning training shared by the built-in methods.

A method supplies one loss function; this module owns the loop, early stopping on
validation NLL and restoring the best weights, so every method trains the same way.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from harness.api import DataBundle

# loss(module, x, y, n_train) -> training loss; nll(module, x, y) -> mean validation NLL
LossFn = Callable[[nn.Module, Tensor, Tensor, int], Tensor]
NllFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class FitConfig:
    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    patience: int = 10


class _Task(L.LightningModule):
    def __init__(self, module: nn.Module, loss: LossFn, nll: NllFn, n_train: int, cfg: FitConfig):
        super().__init__()
        self.module, self.loss_fn, self.nll_fn = module, loss, nll
        self.n_train, self.cfg = n_train, cfg
        self.best_nll, self.best_state = float("inf"), copy.deepcopy(module.state_dict())

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        loss = self.loss_fn(self.module, *batch, self.n_train)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], _: int) -> None:
        self.log("val_nll", self.nll_fn(self.module, *batch), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        nll = float(self.trainer.callback_metrics.get("val_nll", float("inf")))
        if nll < self.best_nll:
            self.best_nll, self.best_state = nll, copy.deepcopy(self.module.state_dict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.module.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )


def train(module: nn.Module, data: DataBundle, cfg: FitConfig, loss: LossFn, nll: NllFn) -> float:
    """Train in place; leaves the module at its best validation NLL, which it returns."""
    for key in ("epochs", "batch_size", "patience"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"method.fit.{key} must be positive, got {getattr(cfg, key)}")
    quiet_lightning()
    x, y = data.train
    train_loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    val_loader = DataLoader(TensorDataset(*data.val), batch_size=4096)
    task = _Task(module, loss, nll, len(x), cfg)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # bars for people, not for logs
        callbacks=[L.pytorch.callbacks.EarlyStopping("val_nll", patience=cfg.patience)],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        trainer.fit(task, train_loader, val_loader)
    module.load_state_dict(task.best_state)
    return task.best_nll


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cross_entropy_nll(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(module(x), y)


def state_tensors(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def active_dropout(module: nn.Module) -> nn.Module:
    """Eval mode everywhere except dropout, so MC dropout samples without touching norms."""
    module.eval()
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.train()
    return module
