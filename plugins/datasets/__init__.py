"""Dataset plugins: embedded Dirty-Digits, packaged Dirty-MNIST (`make data`), IDX loaders."""

from __future__ import annotations

import pluggy

from harness.api import ConfigSchema

from .digits import DirtyDigits, DirtyDigitsConfig
from .idx import (
    MNIST,
    DirtyMNIST,
    DirtyMNISTConfig,
    FashionMNIST,
    FashionMNISTConfig,
    MNISTConfig,
    read_idx,
)
from .regression import Regression1D, Regression1DConfig

hookimpl = pluggy.HookimplMarker("bnn_harness")

__all__ = [
    "MNIST",
    "DirtyDigits",
    "DirtyDigitsConfig",
    "DirtyMNIST",
    "DirtyMNISTConfig",
    "FashionMNIST",
    "FashionMNISTConfig",
    "MNISTConfig",
    "Regression1D",
    "Regression1DConfig",
    "bnn_harness_config_schemas",
    "bnn_harness_datasets",
    "read_idx",
]


@hookimpl
def bnn_harness_datasets():
    return [DirtyDigits(), MNIST(), FashionMNIST(), DirtyMNIST(), Regression1D()]


@hookimpl
def bnn_harness_config_schemas():
    return [
        ConfigSchema("dataset", "dirty_digits_schema", DirtyDigitsConfig),
        ConfigSchema("dataset", "mnist_schema", MNISTConfig),
        ConfigSchema("dataset", "fashion_mnist_schema", FashionMNISTConfig),
        ConfigSchema("dataset", "dirty_mnist_schema", DirtyMNISTConfig),
        ConfigSchema("dataset", "regression1d_schema", Regression1DConfig),
    ]
