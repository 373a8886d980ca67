"""Folding through grokking: a small transformer learns a + b mod 97 while SpaceFoldingCallback measures it.

A two-layer transformer (ReLU MLPs) sees the tokens ``a b =`` and predicts ``(a + b) mod 97`` from the last
position. Trained full-batch with AdamW and strong weight decay on half of the 97 x 97 pairs, it first memorises the
training pairs (train accuracy 100%, test accuracy near chance) and generalises much later: it *groks*. The callback
measures folding along paths between the embeddings of two inputs (``embedding_fn="embed"``: token and position
embeddings ``[B, 3, 64]``; ``forward_fn="from_embeddings"``: the rest of the network), so the paths run in the
space the network learns.

Run (the figure and table go to ``docs/grokking``):

    python examples/grokking.py fit --config examples/grokking.yaml

Every option is on the command line (``python examples/grokking.py fit --help``); after the fit the script reads the
logged curves and draws folding (global and per layer) with train and test accuracy over training.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class ModularAddition(pl.LightningDataModule):
    """All pairs ``(a, b)`` with ``a, b < modulus``, as tokens ``a b =``, labelled ``(a + b) mod modulus``.

    Args:
        modulus: The modulus (a prime); the token ``modulus`` is ``=``.
        train_fraction: Fraction of the pairs used for training; the rest is the validation (and test) split.
        seed: Seed of the split.
    """

    def __init__(self, modulus: int = 97, train_fraction: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0 < train_fraction < 1:
            raise ValueError(f"`train_fraction` must be in (0, 1), got {train_fraction!r}.")
        self.modulus = modulus
        self.train_fraction = train_fraction
        self.seed = seed
        a, b = torch.cartesian_prod(torch.arange(modulus), torch.arange(modulus)).unbind(-1)
        tokens = torch.stack([a, b, torch.full_like(a, modulus)], dim=-1)
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
        split = int(train_fraction * len(tokens))
        data = TensorDataset(tokens[order], ((a + b) % modulus)[order])
        self.train_set = torch.utils.data.Subset(data, range(split))
        self.val_set = torch.utils.data.Subset(data, range(split, len(tokens)))

    def train_dataloader(self) -> DataLoader:
        # Full batch: the whole training split in every step.
        return DataLoader(self.train_set, batch_size=len(self.train_set), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a ReLU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.ReLU(), nn.Linear(mlp_width, width))

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        normed = self.attention_norm(x)
        x = x + self.attention(normed, normed, normed, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x))


class GrokkingTransformer(pl.LightningModule):
    """A small transformer for ``a b =`` -> ``(a + b) mod modulus``, trained full-batch with AdamW.

    Args:
        modulus: The modulus; the vocabulary is ``0 .. modulus`` (``modulus`` is ``=``).
        depth: Transformer blocks.
        width: Embedding width.
        heads: Attention heads.
        mlp_width: Hidden units of each block's ReLU MLP.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (grokking needs it).
    """

    def __init__(
        self,
        modulus: int = 97,
        depth: int = 2,
        width: int = 64,
        heads: int = 4,
        mlp_width: int = 256,
        lr: float = 3e-3,
        weight_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.token_embedding = nn.Embedding(modulus + 1, width)
        self.position_embedding = nn.Parameter(torch.randn(3, width) / math.sqrt(width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_width) for _ in range(depth))
        self.unembed = nn.Linear(width, modulus)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, 3]`` to the embeddings ``[B, 3, width]`` between which folding paths run."""
        return self.token_embedding(tokens) + self.position_embedding

    def from_embeddings(self, x: Tensor) -> Tensor:
        """Embeddings ``[B, 3, width]`` to the logits of the answer ``[B, modulus]``."""
        for block in self.blocks:
            x = block(x)
        return self.unembed(x[:, -1])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.from_embeddings(self.embed(tokens))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        tokens, labels = batch
        logits = self(tokens)
        loss = nn.functional.cross_entropy(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.98)
        )


def read_curves(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged value of a CSVLogger run, per name: ``(step, value)`` in order of step."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(directory / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                if name not in ("step", "epoch") and value:
                    curves.setdefault(name, []).append((int(row["step"]), float(value)))
    return curves


def first_step_above(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((step for step, value in curve if value >= level), None)


def summarise(curves: dict[str, list[tuple[int, float]]], out: Path) -> str:
    """Draw folding with train and test accuracy over training; write the figure and a markdown table."""
    layers = sorted(name for name in curves if name.startswith("spacefold/layer/"))
    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    accuracy, folding = figure.subplots(2, 1, sharex=True)
    for name, label in (("train_acc", "train accuracy"), ("val_acc", "test accuracy")):
        steps, values = zip(*curves[name], strict=True)
        accuracy.plot(steps, values, label=label)
    accuracy.set_ylabel("accuracy")
    accuracy.legend(loc="lower right")
    for name, label, style in [
        ("spacefold/folding", "whole network", "-"),
        *((layer, layer.removeprefix("spacefold/layer/"), "--") for layer in layers),
    ]:
        steps, values = zip(*curves[name], strict=True)
        folding.plot(steps, values, style, label=label)
    folding.set_ylabel("mean chi")
    folding.set_xlabel("optimizer step")
    folding.legend(loc="upper right", fontsize="small")
    memorised = first_step_above(curves["train_acc"], 0.99)
    grokked = first_step_above(curves["val_acc"], 0.99)
    for axes in (accuracy, folding):
        for step, colour in ((memorised, "C0"), (grokked, "C1")):
            if step is not None:
                axes.axvline(step, color=colour, linestyle=":", linewidth=1)
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / "grokking.png", dpi=120)

    def at(name: str, step: int | None) -> str:
        if step is None:
            return "n/a"
        before = [value for logged, value in curves[name] if logged <= step]
        return f"{before[-1]:.4f}" if before else "n/a"

    measured = [step for step, _ in curves["spacefold/folding"]]
    rows = [("start", measured[0]), ("train accuracy >= 99%", memorised), ("test accuracy >= 99%", grokked)]
    rows.append(("end", measured[-1]))
    names = ["spacefold/folding", "spacefold/folded_fraction", *layers]
    table = "| moment | step | " + " | ".join(name.removeprefix("spacefold/") for name in names) + " |\n"
    table += "|---|---|" + "---|" * len(names) + "\n"
    for moment, step in rows:
        table += f"| {moment} | {step if step is not None else 'n/a'} | "
        table += " | ".join(at(name, step) for name in names) + " |\n"
    (out / "grokking.md").write_text(table)
    return table


def main(args: list[str] | None = None, out: Path = Path("docs/grokking")) -> LightningCLI:
    cli = LightningCLI(GrokkingTransformer, ModularAddition, args=args, save_config_kwargs={"overwrite": True})
    csv_logger = next((logger for logger in cli.trainer.loggers if type(logger).__name__ == "CSVLogger"), None)
    if cli.trainer.is_global_zero and csv_logger is not None and cli.subcommand == "fit":
        print(summarise(read_curves(Path(csv_logger.log_dir)), out))
    return cli


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
