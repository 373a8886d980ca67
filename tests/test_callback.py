"""SpaceFoldingCallback in real (tiny, CPU) fits: schedule, logging, checkpoints, hygiene, DDP and the CLI."""

from __future__ import annotations

import atexit
import csv
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spacefold import SpaceFoldingCallback, path_folding

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")


def blobs(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    centres = torch.tensor([[2.0] * 8, [-2.0] * 8, [2.0, -2.0] * 4])
    return TensorDataset(centres[labels] + torch.randn(count, 8, generator=generator), labels)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05, normalise: bool = False) -> None:
        super().__init__()
        self.lr = lr
        extra = [nn.BatchNorm1d(16), nn.Dropout(0.2)] if normalise else []
        self.net = nn.Sequential(nn.Linear(8, 16), *extra, nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Blobs(pl.LightningDataModule):
    def __init__(self, validation: bool = True, validation_seed: int = 1) -> None:
        super().__init__()
        self.validation = validation
        self.validation_seed = validation_seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(blobs(96, 0), batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(blobs(48, self.validation_seed), batch_size=16) if self.validation else []


def destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ProcessGroupCleanup(pl.Callback):
    """Destroy the gloo process group when a spawned process exits.

    Lightning does this at exit for NCCL only; a gloo group torn down by the interpreter's exit sometimes aborts
    the process ("terminate called without an active exception"), which fails the test at random.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        atexit.register(destroy_process_group)


def trainer(tmp_path: Path, callback: SpaceFoldingCallback | None, **kwargs) -> pl.Trainer:
    defaults = {
        "max_steps": 6,
        "logger": TensorBoardLogger(tmp_path, name="tb", version=0),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
        "deterministic": True,
    }
    kwargs.setdefault("callbacks", [] if callback is None else [callback])
    if kwargs.get("strategy") == "ddp_spawn":
        kwargs["callbacks"] = [*kwargs["callbacks"], ProcessGroupCleanup()]
    return pl.Trainer(**{**defaults, **kwargs})


def events(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(directory: Path, tag: str) -> list[int]:
    """The steps of a tag over all event files of a run, in the order they were written (file names need not sort
    so: the writer's counter at the end of a name is not zero-padded)."""
    logged = [event for path in directory.glob("events.out.tfevents.*") for event in events(path).Scalars(tag)]
    return [event.step for event in sorted(logged, key=lambda event: event.wall_time)]


def test_logs_scalars_histogram_and_figures_at_scheduled_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = SpaceFoldingCallback(every_n_train_steps=2, num_pairs=12, steps=16, probe_size=30)
    trainer(tmp_path, callback).fit(Classifier(), datamodule=Blobs())
    log = events(tmp_path / "tb" / "version_0")
    tags = log.Tags()
    callback.wait_for_figures()
    figures = events(tmp_path / "tb" / "version_0" / "figures")
    expected = {"spacefold/folding", "spacefold/folding_median_nonzero", "spacefold/folded_fraction"}
    assert expected | {"spacefold/layer/net.1", "spacefold/layer/net.3"} <= set(tags["scalars"])
    for tag in expected:
        assert [event.step for event in log.Scalars(tag)] == [0, 2, 4, 6]
    assert [event.step for event in log.Histograms("spacefold/chi")] == [0, 2, 4, 6]
    assert not tags["images"]  # drawn by the figure process, into a run of their own
    for tag in ("spacefold/example_paths", "spacefold/layers", "spacefold/class_pairs"):
        assert [event.step for event in figures.Images(tag)] == [0, 6], tag  # the first and the last measurement
    example = figures.Images("spacefold/example_paths")[0]
    assert example.encoded_image_string.startswith(b"\x89PNG") and (example.width, example.height) == (650, 400)
    assert callback.latest_step == 6
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(log.Scalars("spacefold/folding")[-1].value)
    assert callback.latest_result is not None and len(callback.latest_result) == 12


def test_figures_every_few_measurements_and_at_the_last_step(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(
        every_n_train_steps=2, num_pairs=6, steps=8, probe_size=20, figures_every_n_measurements=5
    )
    trainer(tmp_path, callback, max_steps=12).fit(Classifier(), datamodule=Blobs())
    callback.wait_for_figures()
    log = events(tmp_path / "tb" / "version_0")
    figures = events(tmp_path / "tb" / "version_0" / "figures")
    assert [event.step for event in log.Scalars("spacefold/folding")] == [0, 2, 4, 6, 8, 10, 12]
    for tag in ("spacefold/example_paths", "spacefold/layers", "spacefold/class_pairs"):
        assert [event.step for event in figures.Images(tag)] == [0, 10, 12], tag
    # A fit whose last step is not on the schedule: the last measurement (step 10 of 11) still draws them.
    callback = SpaceFoldingCallback(
        every_n_train_steps=2, num_pairs=6, steps=8, probe_size=20, figures_every_n_measurements=3
    )
    trainer(tmp_path / "odd", callback, max_steps=11).fit(Classifier(), datamodule=Blobs())
    callback.wait_for_figures()
    figures = events(tmp_path / "odd" / "tb" / "version_0" / "figures")
    assert [event.step for event in figures.Images("spacefold/layers")] == [0, 6, 10]
    with pytest.raises(ValueError, match="figures_every_n_measurements"):
        SpaceFoldingCallback(figures_every_n_measurements=0)


def test_under_ddp_process_zero_alone_hands_over_the_figures(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(every_n_train_steps=2, num_pairs=6, steps=8, probe_size=20)
    trainer(tmp_path, callback, max_steps=2, devices=2, strategy="ddp_spawn").fit(
        Classifier(lr=0.0), datamodule=Blobs()
    )
    # The spawned process 0 started a figure process of its own, which finishes by itself after the fit.
    folder = tmp_path / "tb" / "version_0" / "figures"
    for _ in range(600):
        files = list(folder.glob("events.out.tfevents.*"))
        drawn = events(folder).Tags()["images"] if files else []
        if "spacefold/layers" in drawn and len(events(folder).Images("spacefold/layers")) == 2:
            break
        time.sleep(0.1)
    assert len(files) == 1
    for tag in ("spacefold/example_paths", "spacefold/layers", "spacefold/class_pairs"):
        assert [event.step for event in events(folder).Images(tag)] == [0, 2], tag


def test_logged_values_equal_a_direct_measurement(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=9, steps=16, probe_size=30, pairing="random")
    model = Classifier()
    trainer(tmp_path, callback, max_steps=3).fit(model, datamodule=Blobs())
    pairs = callback._drawn
    direct = path_folding(model, pairs.starts, pairs.ends, steps=16)
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(direct.chi.mean().item())
    assert callback.latest_metrics["spacefold/layer/net.3"] == pytest.approx(direct.layer_chi[:, 1].mean().item())


def test_exact_measurement_equals_exact_path_folding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=9, probe_size=30, exact=True, log_figures=False)
    model = Classifier()
    trainer(tmp_path, callback, max_steps=3).fit(model, datamodule=Blobs())
    pairs = callback._drawn
    direct = path_folding(model, pairs.starts, pairs.ends, exact=True)
    assert callback.latest_result.regions is not None
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(direct.chi.mean().item())


def test_measuring_does_not_change_training(tmp_path: Path) -> None:
    results = []
    for callback in (None, SpaceFoldingCallback(every_n_train_steps=1, num_pairs=6, steps=8, probe_size=20)):
        torch.manual_seed(0)
        model = Classifier(normalise=True)
        trainer(tmp_path, callback, logger=False).fit(model, datamodule=Blobs())
        results.append({key: value.clone() for key, value in model.state_dict().items()})
    assert all(torch.equal(results[0][key], results[1][key]) for key in results[0])


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(every_n_train_steps=2, num_pairs=6, steps=8, probe_size=20, log_figures=False)
    trainer(tmp_path, callback, max_steps=4, accumulate_grad_batches=3).fit(Classifier(), datamodule=Blobs())
    assert scalar_steps(tmp_path / "tb" / "version_0", "spacefold/folding") == [0, 2, 4]


def test_every_n_epochs(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(
        every_n_train_steps=None, every_n_epochs=1, num_pairs=6, steps=8, probe_size=20, log_figures=False
    )
    trainer(tmp_path, callback, max_steps=-1, max_epochs=2).fit(Classifier(), datamodule=Blobs())
    assert scalar_steps(tmp_path / "tb" / "version_0", "spacefold/folding") == [0, 12, 24]


def test_resume_continues_the_curve_without_gaps_or_duplicates(tmp_path: Path) -> None:
    def make() -> SpaceFoldingCallback:
        return SpaceFoldingCallback(every_n_train_steps=2, num_pairs=6, steps=8, probe_size=20, log_figures=False)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first = make()
    trainer(tmp_path, first, max_steps=5, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        Classifier(), datamodule=Blobs()
    )
    second = make()
    # Other validation data: the pairs can only come from the checkpoint, not from drawing them again.
    trainer(tmp_path, second, max_steps=8).fit(
        Classifier(), datamodule=Blobs(validation_seed=2), ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt")))
    )
    assert scalar_steps(tmp_path / "tb" / "version_0", "spacefold/folding") == [0, 2, 4, 6, 8]
    assert torch.equal(second._drawn.starts, first._drawn.starts)


def test_without_validation_data_falls_back_to_training_data(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=6, steps=8, probe_size=20)
    with pytest.warns(UserWarning, match="no validation data"):
        trainer(tmp_path, callback, max_steps=3, limit_val_batches=0).fit(
            Classifier(), datamodule=Blobs(validation=False)
        )
    assert callback.latest_step == 3


def measured_directly(callback: SpaceFoldingCallback, model: nn.Module, steps: int) -> None:
    """The callback's last values are those of path_folding on its pairs and the model as the fit left it."""
    pairs = callback._drawn
    direct = path_folding(model, pairs.starts, pairs.ends, steps=steps)
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(direct.chi.mean().item(), abs=1e-7)
    assert callback.latest_metrics["spacefold/layer/net.3"] == pytest.approx(direct.layer_chi[:, -1].mean().item())
    torch.testing.assert_close(callback.latest_result.chi, direct.chi)


def test_without_logger_warns_and_keeps_results(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=6, steps=8, probe_size=20)
    model = Classifier()
    with pytest.warns(UserWarning, match="no logger"):
        trainer(tmp_path, callback, max_steps=3, logger=False).fit(model, datamodule=Blobs())
    assert callback.latest_step == 3
    measured_directly(callback, model, steps=8)


def test_model_without_activations_fails_at_fit_start(tmp_path: Path) -> None:
    class Linear(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 3)

    callback = SpaceFoldingCallback(num_pairs=6, steps=8, probe_size=20)
    fit = trainer(tmp_path, callback, max_steps=3)
    with pytest.raises(ValueError, match="No supported activation"):
        fit.fit(Linear(), datamodule=Blobs())
    assert fit.global_step == 0


def test_unknown_layer_fails_at_fit_start(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(num_pairs=6, steps=8, probe_size=20, layers=["net.9"])
    with pytest.raises(ValueError, match=r"Unknown layer name.*net\.1"):
        trainer(tmp_path, callback, max_steps=3).fit(Classifier(), datamodule=Blobs())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_train_steps": -1}, "every_n_train_steps"),
        ({"every_n_train_steps": 0, "measure_at_start": False}, "never measure"),
        ({"num_pairs": 0}, "num_pairs"),
        ({"steps": 0}, "steps"),
        ({"probe_size": 1}, "probe_size"),
        ({"pairing": "nearest"}, "pairing"),
        ({"probe_source": "test"}, "probe_source"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpaceFoldingCallback(**kwargs)


def test_bad_argument_types() -> None:
    with pytest.raises(TypeError, match="layers"):
        SpaceFoldingCallback(layers="net.1")
    with pytest.raises(TypeError, match="probe_dataset"):
        SpaceFoldingCallback(probe_dataset=[1, 2, 3])
    with pytest.raises(TypeError, match="input_key"):
        SpaceFoldingCallback(input_key=1.5)


def test_dict_batches_and_a_given_probe_dataset(tmp_path: Path) -> None:
    class Dicts(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = blobs(30, 2)

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            x, y = self.data[index]
            return {"image": x, "label": y}

    callback = SpaceFoldingCallback(
        every_n_train_steps=3, num_pairs=9, steps=8, probe_dataset=Dicts(), input_key="image", label_key="label"
    )
    model = Classifier()
    trainer(tmp_path, callback, max_steps=3).fit(model, datamodule=Blobs())
    data = blobs(30, 2)
    for points, labels in ((callback._drawn.starts, callback._drawn.start_labels), (callback._drawn.ends, None)):
        rows = [int((data.tensors[0] == point).all(-1).nonzero()) for point in points]  # every point is an item
        if labels is not None:
            assert labels.tolist() == data.tensors[1][rows].tolist()
    measured_directly(callback, model, steps=8)
    bad = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=9, steps=8, probe_dataset=Dicts())
    with pytest.raises(ValueError, match=r"keys \['image', 'label'\]; set `input_key`"):
        trainer(tmp_path, bad, max_steps=3).fit(Classifier(), datamodule=Blobs())


class SavesResult(pl.Callback):
    """Saves the latest measurement's per-path chi and r2 of each process (a spawned process's callback is a copy)."""

    def __init__(self, spacefold: SpaceFoldingCallback, directory: Path) -> None:
        self.spacefold, self.directory = spacefold, directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.spacefold.latest_result
        torch.save((result.chi, result.r2), self.directory / f"result{trainer.global_rank}.pt")


def read_csv_metrics(directory: Path) -> dict[int, dict[str, float]]:
    rows = {}
    with open(next(directory.rglob("metrics.csv"))) as file:
        for row in csv.DictReader(file):
            values = {key: float(value) for key, value in row.items() if key.startswith("spacefold/") and value}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def logged_on_one_and_two_processes(
    tmp_path: Path,
    make_callback: Callable[[], SpaceFoldingCallback],
    fit: Callable[[pl.Trainer], object],
    extra_callbacks: Callable[[SpaceFoldingCallback], list[pl.Callback]] = lambda _callback: [],
    **trainer_kwargs: object,
) -> tuple[list[dict[int, dict[str, float]]], list[SpaceFoldingCallback]]:
    """The CSV-logged values and the callbacks of the same 2-step fit on one process and on two (``ddp_spawn``)."""
    logged, callbacks = [], []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        torch.manual_seed(0)
        callback = make_callback()
        directory = tmp_path / f"devices{devices}"
        run = trainer(
            directory,
            callback,
            max_steps=2,
            devices=devices,
            strategy=strategy,
            logger=CSVLogger(directory),
            callbacks=[callback, *extra_callbacks(callback)],
            **trainer_kwargs,
        )
        fit(run)
        logged.append(read_csv_metrics(directory))
        callbacks.append(callback)
    return logged, callbacks


def fit_blobs(run: pl.Trainer) -> None:
    run.fit(Classifier(lr=0.0), datamodule=Blobs())


@pytest.mark.parametrize("pairing", ["class", "centroid"])
def test_ddp_two_processes_log_the_same_values_as_one(tmp_path: Path, pairing: str) -> None:
    logged, callbacks = logged_on_one_and_two_processes(
        tmp_path,
        lambda: SpaceFoldingCallback(
            every_n_train_steps=2, num_pairs=14, steps=16, probe_size=30, pairing=pairing, centroids_per_class=2
        ),
        fit_blobs,
        extra_callbacks=lambda callback: [SavesResult(callback, tmp_path)],
    )
    assert set(logged[0]) == {0, 2}
    assert logged[0].keys() == logged[1].keys()
    for step in logged[0]:
        assert logged[0][step].keys() == logged[1][step].keys()
        for key, value in logged[0][step].items():
            assert logged[1][step][key] == pytest.approx(value, abs=1e-6), (step, key)
    # Each process measured its own half of the pairs (14 class pairs, or 30 distinct centroid pairs).
    shares = [torch.load(tmp_path / f"result{rank}.pt")[0] for rank in (0, 1)]
    half = len(callbacks[0].latest_result) // 2
    assert [len(share) for share in shares] == [half, half] and half in (7, 15)
    torch.testing.assert_close(torch.cat(shares), callbacks[0].latest_result.chi)


SEED = 6  # the seed whose one random pair folds (chi = 1/4) through Classifier(lr=0.0) after torch.manual_seed(0)


def test_ddp_process_without_pairs_joins_the_sync(tmp_path: Path) -> None:
    logged, _ = logged_on_one_and_two_processes(
        tmp_path,
        lambda: SpaceFoldingCallback(
            every_n_train_steps=2, num_pairs=1, steps=16, probe_size=30, pairing="random", log_figures=False, seed=SEED
        ),
        fit_blobs,
    )
    assert set(logged[0]) == set(logged[1]) == {0, 2}
    assert logged[0][2]["spacefold/folding"] == 0.25  # a value that a process leaving its pair out would change
    for step, values in logged[0].items():
        assert logged[1][step] == pytest.approx(values)


def test_bf16_true_precision(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=9, steps=16, probe_size=30)
    model = Classifier()
    trainer(tmp_path, callback, max_steps=3, precision="bf16-true").fit(model, datamodule=Blobs())
    assert next(model.parameters()).dtype == torch.bfloat16
    # The network measured as it trains, in bfloat16: the float32 network's walks differ.
    pairs = callback._drawn
    direct = path_folding(model, pairs.starts.bfloat16(), pairs.ends.bfloat16(), steps=16)
    assert callback.latest_result.chi.dtype == torch.float32
    assert torch.equal(callback.latest_result.chi, direct.chi) and torch.equal(callback.latest_result.r2, direct.r2)
    float32 = path_folding(model.float(), pairs.starts, pairs.ends, steps=16)
    assert not torch.equal(float32.r2, direct.r2)


class NoisyBlobs(torch.utils.data.Dataset):
    """Training data with random augmentation from torch, Python and NumPy."""

    def __init__(self) -> None:
        self.data = blobs(96, 0)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[index]
        noise = torch.randn(8) * 0.1 + random.random() * 0.1 + float(np.random.rand()) * 0.1
        return x + noise, y


def test_drawing_from_augmented_training_data_does_not_change_training(tmp_path: Path) -> None:
    class Noisy(Blobs):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(NoisyBlobs(), batch_size=8, shuffle=True)

    results = []
    for callback in (None, SpaceFoldingCallback(every_n_train_steps=2, num_pairs=6, steps=8, probe_source="train")):
        pl.seed_everything(0)
        model = Classifier(normalise=True)
        trainer(tmp_path, callback, logger=False).fit(model, datamodule=Noisy())
        results.append({key: value.clone() for key, value in model.state_dict().items()})
    assert all(torch.equal(results[0][key], results[1][key]) for key in results[0])


def test_probe_comes_from_validation_data_that_the_first_epoch_does_not_use(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=6, steps=8, probe_size=48, pairing="random")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callback, max_steps=3, check_val_every_n_epoch=2).fit(Classifier(), datamodule=Blobs())
    assert not [warning for warning in caught if "no validation data" in str(warning.message)]
    validation = blobs(48, 1).tensors[0]
    assert all((validation == start).all(-1).any() for start in callback._drawn.starts)


def test_measure_at_start_false_with_gradient_accumulation(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(
        every_n_train_steps=2, measure_at_start=False, num_pairs=6, steps=8, probe_size=20, log_figures=False
    )
    trainer(tmp_path, callback, max_steps=4, accumulate_grad_batches=3).fit(Classifier(), datamodule=Blobs())
    assert scalar_steps(tmp_path / "tb" / "version_0", "spacefold/folding") == [2, 4]


def test_state_key_tells_configurations_apart() -> None:
    keys = {
        SpaceFoldingCallback(pairing="centroid", centroids_per_class=3).state_key,
        SpaceFoldingCallback(pairing="centroid", centroids_per_class=5).state_key,
        SpaceFoldingCallback(pairing="centroid", centroids_per_class=5, include_same_class=False).state_key,
        SpaceFoldingCallback(label_key="y", input_key="x").state_key,
    }
    assert len(keys) == 4


class Stream(torch.utils.data.IterableDataset):
    """Validation data that can only be read in order, with string ids next to the tensors."""

    def __iter__(self):
        data = blobs(48, 1)
        for index in range(len(data)):
            x, y = data[index]
            yield {"id": f"item{index}", "x": x, "y": y}


def test_iterable_validation_data_is_read_in_order(tmp_path: Path) -> None:
    class Streamed(Blobs):
        def val_dataloader(self) -> DataLoader:
            return DataLoader(Stream(), batch_size=16)

    callback = SpaceFoldingCallback(
        every_n_train_steps=3, num_pairs=9, steps=8, probe_size=20, input_key="x", label_key="y", pairing="class"
    )
    model = Classifier()
    trainer(tmp_path, callback, max_steps=3).fit(model, datamodule=Streamed())
    first = blobs(48, 1)[:20]  # the first 20 items, in the stream's order
    for points, labels in ((callback._drawn.starts, callback._drawn.start_labels), (callback._drawn.ends, None)):
        rows = [int((first[0] == point).all(-1).nonzero()) for point in points]
        if labels is not None:
            assert labels.tolist() == first[1][rows].tolist()
    measured_directly(callback, model, steps=8)
