"""Folding curves of a run trained without the callback: measure every checkpoint of a folder.

Each checkpoint is loaded into the LightningModule class and measured by SpaceFoldingCallback in
``trainer.validate``, on the same probe pairs (drawn from the validation data with ``--seed``), and logged to
TensorBoard at the checkpoint's step, as if the callback had measured during training. The values also go to a CSV
file, one row per checkpoint.

Checkpoints every N steps come from ``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)``, e.g. on the main job:
``python examples/train.py fit --config examples/config.yaml --trainer.callbacks+=ModelCheckpoint
--trainer.callbacks.every_n_train_steps=25 --trainer.callbacks.save_top_k=-1``.

A checkpoint is a pickle, and unpickling can run code that the file carries. Every file is first read with
``torch.load(..., weights_only=True)``, which unpickles only tensors and plain Python values, as Lightning's own
checkpoints hold; a file that holds anything else is refused, naming it, before any checkpoint is measured. Pass
``--trust-checkpoints`` only for files whose origin you trust (e.g. with custom objects among the hyper-parameters):
they are then read in full, by this script and by Lightning.

Run: python examples/measure_checkpoints.py runs/digits/version_0/checkpoints [--module digits.MLPClassifier]
[--datamodule digits.DigitsDataModule] [--dataset digits|mnist1d] [--out runs/checkpoints] [--trust-checkpoints]
(``--dataset`` is passed to the DataModule, which must then take a ``dataset`` argument, as the examples' does.)
"""

from __future__ import annotations

import argparse
import csv
import importlib
import pickle
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
from digits import DATASETS

from lightning_spacefold import SpaceFoldingCallback


def import_class(path: str) -> type:
    """``module.Class`` (importable, or a file of ``examples/``) to the class."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"Give the class as module.Class, got {path!r}.")
    return getattr(importlib.import_module(module), name)


TRUST_FLAG = "--trust-checkpoints"


def checkpoint_steps(folder: Path, trust: bool = False) -> list[tuple[int, Path]]:
    """The folder's checkpoints with their global step, in order of step; all are read before any is measured.

    Without ``trust`` a file is unpickled with ``weights_only=True`` (tensors and plain values only), so a file that
    would run code when read is refused with a ``ValueError`` that names it.
    """
    paths = sorted(folder.glob("*.ckpt"))
    if not paths:
        raise ValueError(f"No *.ckpt files in {folder}.")
    steps = []
    for path in paths:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[-1]
            raise ValueError(
                f"{path} holds objects other than tensors and plain Python values, and reading them could run code "
                f"that the file carries, so it was not read ({reason}). If you trust where the file comes from, "
                f"pass {TRUST_FLAG} to read it in full."
            ) from None
        if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint (it has no `global_step`).")
        steps.append(checkpoint["global_step"])
    return sorted(zip(steps, paths, strict=True))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, help="folder of *.ckpt files")
    parser.add_argument("--module", default="digits.MLPClassifier", help="the LightningModule class, module.Class")
    parser.add_argument("--datamodule", default="digits.DigitsDataModule", help="its data (for the probe set)")
    parser.add_argument("--dataset", choices=DATASETS, help="the DataModule's `dataset` (default: its own default)")
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoints"), help="TensorBoard logs and the CSV")
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--pairing", default="auto", choices=["auto", "random", "class", "centroid"])
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true")
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="read checkpoints in full (weights_only=False), which runs any code they carry: trusted files only",
    )
    args = parser.parse_args(argv)
    try:
        checkpoints = checkpoint_steps(args.checkpoints, args.trust_checkpoints)
    except ValueError as error:
        parser.error(str(error))

    dataset = {} if args.dataset is None else {"dataset": args.dataset}
    module_class, datamodule = import_class(args.module), import_class(args.datamodule)(**dataset)
    callback = SpaceFoldingCallback(
        num_pairs=args.num_pairs,
        steps=args.steps,
        exact=args.exact,
        pairing=args.pairing,
        probe_size=args.probe_size,
        seed=args.seed,
    )
    # Lightning reads each file again: a trusted one in full, the others (checked above) as torch.load does by default.
    trusted = {"weights_only": False} if args.trust_checkpoints else {}
    rows = []
    for step, path in checkpoints:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(args.out, name="", version=""),  # one folder: one curve over the checkpoints
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = module_class.load_from_checkpoint(path, **trusted)
        trainer.validate(model, datamodule=datamodule, ckpt_path=path, **trusted)
        if callback.latest_step != step:
            print(f"step {step}: not measured ({path.name}; the warning above says why)")
            continue
        rows.append({"step": step, "checkpoint": path.name, **callback.latest_metrics})
        print(f"step {step}: folding {callback.latest_metrics['spacefold/folding']:.4f} ({path.name})")

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "folding.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["step", "checkpoint", *callback.latest_metrics])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nCurves: tensorboard --logdir {args.out}\nTable: {args.out / 'folding.csv'}")
    return rows


if __name__ == "__main__":
    main()
