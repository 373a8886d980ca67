"""The main job: train an MLP with the Lightning CLI while SpaceFoldingCallback measures its folding.

Run: python examples/train.py fit --config examples/config.yaml
Everything is configurable from the command line, e.g. ``--model.depth 5 --model.width 12`` or
``--trainer.callbacks.every_n_train_steps 10``; ``python examples/train.py fit --help`` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

sys.path.insert(0, str(Path(__file__).parent))
from digits import DigitsDataModule, MLPClassifier

from lightning_spacefold import SpaceFoldingCallback


class SpaceFoldingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.input_dim", "model.input_dim", apply_on="instantiate")


def report(cli: LightningCLI) -> None:
    """Print where the logs are, how to open them, and the last folding values."""
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return
    callback = next((c for c in trainer.callbacks if isinstance(c, SpaceFoldingCallback)), None)
    if trainer.logger is not None:
        print(f"\nLogs: {trainer.logger.log_dir}\nOpen them with: tensorboard --logdir {trainer.logger.save_dir}")
    if callback is None or not callback.latest_metrics:
        return
    print(f"\nFolding at step {callback.latest_step}:")
    print("| value | measured |\n|---|---|")
    for name, value in callback.latest_metrics.items():
        print(f"| {name} | {value:.4f} |")


def main(args: list[str] | None = None) -> LightningCLI:
    cli = SpaceFoldingCLI(MLPClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})
    report(cli)
    return cli


if __name__ == "__main__":
    main()
