"""Every example runs in a reduced size, so that none can rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_spacefold import path_folding
from lightning_spacefold.probe import draw_probe, pair_probe

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_trained_mlp(tmp_path: Path, capsys) -> None:
    figure = tmp_path / "walks.png"
    results = load("measure_trained_mlp").main(
        ["--epochs", "3", "--pairs", "16", "--steps", "8", "--figure", str(figure)]
    )
    assert figure.stat().st_size > 10_000
    assert 0.5 < results["accuracy"] <= 1.0
    assert 0.0 <= results["folding"] < 1.0
    assert "| whole network |" in capsys.readouterr().out


def test_main_job_from_the_yaml_config(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = EXAMPLES / "config.yaml"
    cli = load("train").main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks.num_pairs=20",
            "--trainer.callbacks.steps=8",
        ]
    )
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SpaceFoldingCallback")
    assert (callback.every_n_train_steps, callback.num_pairs, callback.pairing) == (2, 20, "centroid")
    assert len(callback.latest_result) == 10 * 9 * 3 * 3
    assert callback.latest_step == 4
    output = capsys.readouterr().out
    assert "tensorboard --logdir runs" in output and "| spacefold/folding |" in output
    assert list((tmp_path / "runs" / "digits").glob("version_0/events.out.tfevents.*"))


def test_mnist1d_is_generated_locally_standardised_and_fixed(monkeypatch) -> None:
    import random

    import mnist1d.data
    import numpy as np

    def no_download(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated, never downloaded")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    monkeypatch.setattr(mnist1d.data.requests, "get", no_download)
    digits = load("digits")
    random.seed(7)
    np.random.seed(7)
    x_train, y_train, x_val, y_val = digits.load_split("mnist1d")
    # The caller's random streams are untouched by the generator's own seeding.
    assert random.random() == random.Random(7).random()
    assert np.random.random() == np.random.RandomState(7).random_sample()
    assert (x_train.shape, x_val.shape, y_train.shape, y_val.shape) == ((4000, 40), (1000, 40), (4000,), (1000,))
    assert (x_train.dtype, y_train.dtype) == (torch.float32, torch.int64)
    assert set(y_train.unique().tolist()) == set(range(10))
    torch.testing.assert_close(x_train.mean(0), torch.zeros(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(x_train.std(0, unbiased=False), torch.ones(40), atol=1e-4, rtol=0)
    again = digits.load_split("mnist1d", seed=3)  # the split seed is for digits; MNIST-1D is one fixed dataset
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_val)
    with pytest.raises(ValueError, match="`dataset` must be one of"):
        digits.load_split("mnist")


def test_main_job_on_mnist1d_from_the_command_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = load("train").main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "config.yaml"),
            "--data.dataset",
            "mnist1d",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks.steps=8",
        ]
    )
    assert cli.model.hparams.input_dim == 40 and cli.datamodule.dataset == "mnist1d"
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SpaceFoldingCallback")
    assert len(callback.latest_result) == 10 * 9 * 3 * 3 and callback.latest_step == 4
    assert 0.0 <= callback.latest_metrics["spacefold/folding"] < 1.0


def test_main_job_with_the_callback_added_on_the_command_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = load("train").main(
        [
            "fit",
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks+=lightning_spacefold.SpaceFoldingCallback",
            "--trainer.callbacks.num_pairs=32",
            "--trainer.callbacks.every_n_train_steps=3",
            "--trainer.callbacks.steps=8",
            "--model.depth=2",
            "--model.activation=gelu",
        ]
    )
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SpaceFoldingCallback")
    assert callback.num_pairs == 32 and callback.latest_step == 3
    assert set(callback.latest_metrics) == {
        "spacefold/folding",
        "spacefold/folding_median_nonzero",
        "spacefold/folded_fraction",
        "spacefold/layer/net.2",
        "spacefold/layer/net.4",
    }


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_regularization_experiment(tmp_path: Path, dataset: str) -> None:
    rows = load("regularization_experiment").main(["--quick", "--dataset", dataset, "--out", str(tmp_path)])
    assert [row["weight"] for row in rows] == [0.0, 1.0]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith({"digits": "Digits, MLP 64-", "mnist1d": "MNIST-1D, MLP 40-"}[dataset])
    assert "| weight |" in text and "| rise of folding (Spearman, epochs 1..) |" in text
    header, *curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert header == "weight,seed,step,folding,median_nonzero" and len(curves) == 4  # 2 runs, at the start and 1 epoch
    assert (tmp_path / "folding_over_training.png").stat().st_size > 0


def test_measure_checkpoints(tmp_path: Path, monkeypatch) -> None:

    monkeypatch.chdir(tmp_path)
    digits = load("digits")
    torch.manual_seed(0)
    pl.Trainer(
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_train_steps=2, save_top_k=-1)],
    ).fit(digits.MLPClassifier(), datamodule=digits.DigitsDataModule())
    arguments = ["ckpt", "--out", "measured", "--num-pairs", "12", "--steps", "16", "--pairing", "random"]
    rows = load("measure_checkpoints").main(arguments)
    assert [row["step"] for row in rows] == [2, 4]
    tags = [event.step for event in events_of(tmp_path / "measured", "spacefold/folding")]
    assert tags == [2, 4]
    lines = (tmp_path / "measured" / "folding.csv").read_text().splitlines()
    assert lines[0].startswith("step,checkpoint,spacefold/folding,") and len(lines) == 3
    # Each row is the checkpoint's own folding on one fixed set of pairs (drawn as the callback draws them).
    datamodule = digits.DigitsDataModule()
    datamodule.setup("validate")
    inputs, _ = draw_probe(datamodule.val_set, 512, 0)
    pairs = pair_probe(
        inputs, None, pairing="random", num_pairs=12, include_same_class=True, centroids_per_class=5, seed=0
    )
    for row, path in zip(rows, sorted(Path("ckpt").glob("*.ckpt")), strict=True):
        model = digits.MLPClassifier.load_from_checkpoint(path)
        direct = path_folding(model, pairs.starts, pairs.ends, steps=16).chi.mean().item()
        assert row["spacefold/folding"] == pytest.approx(direct, abs=1e-6)
    assert rows[0]["spacefold/folding"] != rows[1]["spacefold/folding"]


def events_of(directory: Path, tag: str) -> list:
    found = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            found += accumulator.Scalars(tag)
    return sorted(found, key=lambda event: event.step)


SMALL_GROKKING = [
    "--trainer.enable_progress_bar=false",
    "--trainer.max_steps=6",
    "--trainer.check_val_every_n_epoch=2",
    "--trainer.log_every_n_steps=1",
    "--model.modulus=11",
    "--data.modulus=11",
    "--model.width=16",
    "--model.heads=2",
    "--model.mlp_width=32",
]


def test_grokking_quick(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    arguments = ["fit", "--config", str(EXAMPLES / "grokking.yaml"), *SMALL_GROKKING]
    callback_arguments = [f"--trainer.callbacks.{name}" for name in ("every_n_train_steps=3", "num_pairs=8", "steps=8")]
    cli = load("grokking").main([*arguments, *callback_arguments], out=tmp_path / "out")
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SpaceFoldingCallback")
    assert callback.latest_step == 6 and len(callback.latest_result) == 8
    assert callback.latest_result.layer_names == ["blocks.0.mlp.1", "blocks.1.mlp.1"]
    assert (tmp_path / "out" / "grokking.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "grokking.md").read_text()
    assert "| start | 0 |" in table and "| end | 6 |" in table and "layer/blocks.1.mlp.1" in table
    assert "| moment | step | folding |" in capsys.readouterr().out


def test_a_token_model_from_the_command_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    callback = "--trainer.callbacks+=lightning_spacefold.SpaceFoldingCallback"
    options = ["embedding_fn=embed", "forward_fn=from_embeddings", "every_n_train_steps=3", "num_pairs=8", "steps=8"]
    arguments = ["fit", *SMALL_GROKKING, "--trainer.logger=false", callback]
    cli = load("grokking").main([*arguments, *(f"--trainer.callbacks.{option}" for option in options)])
    spacefold = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SpaceFoldingCallback")
    assert (spacefold.embedding_fn, spacefold.forward_fn) == ("embed", "from_embeddings")
    assert spacefold.latest_step == 6 and spacefold._drawn.inputs.dtype == torch.long
    model = cli.model
    pairs = spacefold._pair(model.embed(spacefold._drawn.inputs).detach(), spacefold._drawn.labels)
    direct = path_folding(model, pairs.starts, pairs.ends, steps=8, forward=model.from_embeddings)
    torch.testing.assert_close(spacefold.latest_result.chi, direct.chi)
