"""The training loop every method shares, reached by plugins through `harness.api`.

A method supplies one loss function; this module owns the loop, early stopping on
validation NLL and restoring the best weights, so every method trains the same way. It
lives in the core because several plugins (methods, quantization-aware training, third-party
packages) need it and plugins may import nothing but `harness.api`.

A loss or validation NLL that is not finite stops training with a `HarnessError`: early
stopping alone would end the run quietly and restore the initial random weights as if they
were the best, and the cache would then keep them as a trained posterior. Lightning is
imported when `train` is first called, so importing the API stays cheap.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from harness.api import TRAINING, DataBundle, HarnessError

# loss(module, x, y, n_train) -> training loss; nll(module, x, y) -> mean validation NLL
LossFn = Callable[[nn.Module, Tensor, Tensor, int], Tensor]
NllFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

__all__ = list(TRAINING)  # the names harness.api re-exports, listed there once


@dataclass
class FitConfig:
    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    patience: int = 10


def diverged(what: str, epoch: int, value: float) -> HarnessError:
    return HarnessError(
        f"training diverged: non-finite {what} ({value}) at epoch {epoch}; lower the learning "
        "rate (method.fit.lr) or check the data for NaN/inf; nothing was cached"
    )


@cache
def _task_class() -> type:
    """The LightningModule, defined on first use so that lightning loads only to train."""
    import lightning as L

    class Task(L.LightningModule):
        def __init__(
            self, module: nn.Module, loss: LossFn, nll: NllFn, n_train: int, cfg: FitConfig
        ):
            super().__init__()
            self.module, self.loss_fn, self.nll_fn = module, loss, nll
            self.n_train, self.cfg = n_train, cfg
            self.best_nll, self.best_state = float("inf"), copy.deepcopy(module.state_dict())

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            loss = self.loss_fn(self.module, *batch, self.n_train)
            if not torch.isfinite(loss.detach()):
                raise diverged("training loss", self.current_epoch, float(loss.detach()))
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch: tuple[Tensor, Tensor], _: int) -> None:
            self.log("val_nll", self.nll_fn(self.module, *batch), prog_bar=True)

        def on_validation_epoch_end(self) -> None:
            value = self.trainer.callback_metrics.get("val_nll")
            nll = float("inf") if value is None else float(value)
            if value is not None and not math.isfinite(nll):  # the sanity check too: NaN data
                raise diverged("validation NLL", self.current_epoch, nll)
            if nll < self.best_nll:
                self.best_nll, self.best_state = nll, copy.deepcopy(self.module.state_dict())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(
                self.module.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
            )

    return Task


def train(module: nn.Module, data: DataBundle, cfg: FitConfig, loss: LossFn, nll: NllFn) -> float:
    """Train in place; leaves the module at its best validation NLL, which it returns.

    Raises `HarnessError` on bad settings and when the loss or validation NLL stops being
    finite, so a diverged run never reaches the cache.
    """
    for key in ("epochs", "batch_size", "patience"):
        if getattr(cfg, key) <= 0:
            raise HarnessError(f"method.fit.{key} must be positive, got {getattr(cfg, key)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise HarnessError(f"method.fit.lr must be a positive finite number, got {cfg.lr}")
    import lightning as L

    quiet_lightning()
    x, y = data.train
    train_loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    val_loader = DataLoader(TensorDataset(*data.val), batch_size=4096)
    task: Any = _task_class()(module, loss, nll, len(x), cfg)
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
    if not math.isfinite(task.best_nll):  # no validation ran after a step: nothing to keep
        raise diverged("validation NLL", trainer.current_epoch, task.best_nll)
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
