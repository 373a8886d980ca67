"""A configurable MLP classifier and a DataModule for scikit-learn's digits (no download), MNIST or Fashion-MNIST.

Shared by the examples; `train.py` exposes both through the Lightning CLI. ``digits_split`` and ``train_mlp`` are
for the examples that train many small networks: a plain loop is much faster than a Trainer for them on a CPU.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
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


class DigitsDataModule(pl.LightningDataModule):
    """Digits from scikit-learn (8x8, no download), or MNIST / Fashion-MNIST through torchvision (downloads).

    Args:
        dataset: ``digits`` (1797 images, 25% held out for validation and testing), ``mnist`` or
            ``fashion_mnist`` (needs ``pip install torchvision`` and internet access; their test split serves for
            validation and testing).
        batch_size: Training and validation batch size.
        seed: Seed of the digits train/validation split.
        data_dir: Where torchvision stores MNIST and Fashion-MNIST.
    """

    def __init__(
        self,
        dataset: Literal["digits", "mnist", "fashion_mnist"] = "digits",
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
        return 64 if self.dataset == "digits" else 28 * 28

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        if self.dataset == "digits":
            inputs, labels = load_digits(return_X_y=True)
            split = train_test_split(inputs / 16.0, labels, test_size=0.25, random_state=self.seed, stratify=labels)
            x_train, x_val, y_train, y_val = (torch.as_tensor(part) for part in split)
            self.train_set = TensorDataset(x_train.float(), y_train.long())
            self.val_set = TensorDataset(x_val.float(), y_val.long())
        else:
            self.train_set, self.val_set = (self._torchvision(train) for train in (True, False))

    def _torchvision(self, train: bool) -> TensorDataset:
        try:
            from torchvision import datasets
        except ImportError as error:
            raise ImportError(f"dataset={self.dataset!r} needs torchvision: pip install torchvision") from error
        source = datasets.MNIST if self.dataset == "mnist" else datasets.FashionMNIST
        data = source(self.data_dir, train=train, download=True)
        return TensorDataset(data.data.float().div(255).unsqueeze(1), data.targets.long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits split of :class:`DigitsDataModule`: train inputs, train labels, validation inputs and labels."""
    data = DigitsDataModule(dataset="digits", seed=seed)
    data.setup("fit")
    return (*data.train_set.tensors, *data.val_set.tensors)


def train_mlp(
    inputs: Tensor, labels: Tensor, depth: int, width: int, epochs: int, seed: int, activation: str = "relu"
) -> MLPClassifier:
    """An :class:`MLPClassifier` trained with a plain loop (Adam, cross-entropy, batches of 64), in eval mode."""
    torch.manual_seed(seed)
    model = MLPClassifier(input_dim=inputs[0].numel(), num_classes=10, depth=depth, width=width, activation=activation)
    optimizer = model.configure_optimizers()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()
