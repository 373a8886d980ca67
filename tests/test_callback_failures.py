"""A callback that can be left on: failed and non-finite measurements, out of memory, DDP, sharded-style forwards."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_spacefold import NonFiniteError, SpaceFoldingCallback
from tests.test_callback import Blobs, Classifier, SavesResult, blobs, events, read_csv_metrics, scalar_steps, trainer


def measuring(**kwargs) -> SpaceFoldingCallback:
    arguments = {"every_n_train_steps": 2, "num_pairs": 6, "steps": 8, "probe_size": 20, "pairing": "random"}
    return SpaceFoldingCallback(**{**arguments, **kwargs})


def spacefold_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(warning.message) for warning in caught if "SpaceFoldingCallback" in str(warning.message)]


class DivergesAtStep(Classifier):
    """Its weights turn NaN in the optimizer step that ends at ``step + 1``."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.diverge_at = step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.diverge_at:
            with torch.no_grad():
                self.net[2].weight.fill_(torch.nan)
        return super().training_step(batch, batch_idx)


def test_a_diverged_network_is_warned_about_once_and_never_logged(tmp_path: Path) -> None:
    callback = measuring()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = trainer(tmp_path, callback, max_steps=8)
        fitted.fit(DivergesAtStep(3), datamodule=Blobs())
    assert fitted.global_step == 8
    logged = tmp_path / "tb" / "version_0"
    assert scalar_steps(logged, "spacefold/folding") == [0, 2]
    assert scalar_steps(logged, "spacefold/layer/net.3") == [0, 2]
    messages = spacefold_warnings(caught)
    assert len(messages) == 1, messages  # steps 4, 6 and 8 fail alike: one warning
    assert "the measurement at step 4 failed and is skipped" in messages[0]
    assert "NonFiniteError" in messages[0] and "the network has non-finite values" in messages[0]
    assert callback.latest_step == 2 and len(callback.latest_result) == 6
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(
        callback.latest_result.chi.mean().item(), abs=1e-7
    )


def test_on_error_raise_ends_the_run_with_the_error(tmp_path: Path) -> None:
    fitted = trainer(tmp_path, measuring(on_error="raise"), max_steps=8)
    with pytest.raises(NonFiniteError, match="fed layer 'net.1'"):  # the NaN loss's step spreads NaN everywhere
        fitted.fit(DivergesAtStep(3), datamodule=Blobs())
    assert fitted.global_step == 4


class RejectsLargeBatches(Classifier):
    """Fails on batches larger than ``largest``: the training batches pass, the measurement's do not."""

    def __init__(
        self, largest: int, error: type[Exception] = RuntimeError, message: str = "batch too large", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.largest, self.error, self.message = largest, error, message
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.largest:
            raise self.error(self.message)
        return super().forward(x)


def test_a_failing_measurement_is_skipped_and_leaves_training_and_the_model_alone(tmp_path: Path) -> None:
    states = []
    for callback in (None, measuring(num_pairs=4, steps=7, batch_size=32)):
        torch.manual_seed(0)
        model = RejectsLargeBatches(largest=16, normalise=True)
        model.net[0].weight.requires_grad_(False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path / str(callback is None), callback, max_steps=6).fit(model, datamodule=Blobs())
        states.append({key: value.clone() for key, value in model.state_dict().items()})
    messages = spacefold_warnings(caught)
    assert len(messages) == 1 and "the measurement at step 0 failed" in messages[0]
    assert "RuntimeError: batch too large" in messages[0]
    assert callback.latest_step is None and callback.latest_metrics == {}
    assert not [tag for tag in events(tmp_path / "False" / "tb" / "version_0").Tags()["scalars"] if "spacefold" in tag]
    # The model as it was: weights and BatchNorm statistics as without the callback, flags, hooks.
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert model.training and all(module.training for module in model.modules())
    assert not model.net[0].weight.requires_grad and model.net[4].weight.requires_grad
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_out_of_memory_halves_the_batch_size_and_keeps_it(tmp_path: Path) -> None:
    # 6 paths of 9 points in batches of 128 -> 64 -> 32 points: the last fits under 40.
    torch.manual_seed(0)
    healthy = measuring(batch_size=128, log_figures=False)
    trainer(tmp_path / "healthy", healthy, logger=False).fit(Classifier(), datamodule=Blobs())
    torch.manual_seed(0)  # the same network and the same training as the healthy run's
    callback = measuring(batch_size=128, log_figures=False)
    model = RejectsLargeBatches(largest=40, error=torch.OutOfMemoryError, message="CUDA out of memory. Tried ...")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "oom", callback).fit(model, datamodule=Blobs())
    messages = spacefold_warnings(caught)
    assert len(messages) == 1, messages
    assert "out of memory with 128 points per forward pass; measuring with 32 from now on" in messages[0]
    assert callback._batch_size == 32
    assert scalar_steps(tmp_path / "oom" / "tb" / "version_0", "spacefold/folding") == [0, 2, 4, 6]
    assert callback.latest_metrics == healthy.latest_metrics
    measured = [size for size in model.calls if size > 8]  # not the training batches of 8
    assert measured == [54, 54, 27, 27] + [27, 27] * 3  # failed at 128 and 64 points (all 54), then 27 + 27


def test_out_of_memory_at_one_path_per_pass_is_a_skipped_measurement(tmp_path: Path) -> None:
    callback = measuring(batch_size=64, log_figures=False)
    model = RejectsLargeBatches(largest=8, error=torch.OutOfMemoryError, message="CUDA out of memory.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callback, max_steps=2).fit(model, datamodule=Blobs())
    messages = spacefold_warnings(caught)
    assert len(messages) == 1, messages  # 64, 32, 16 and 9 points (one path) all failed
    assert "the measurement at step 0 failed" in messages[0] and "OutOfMemoryError" in messages[0]
    assert callback.latest_step is None


class FailsOnRankOneAt(Classifier):
    """Process 1's measurement forward passes fail at ``step``; training and the other process are healthy."""

    def __init__(self, step: int) -> None:
        super().__init__(lr=0.0)
        self.fail_at = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.global_rank == 1 and self.global_step == self.fail_at and len(x) > 2:
            raise RuntimeError("process 1 cannot measure")
        return super().forward(x)


@pytest.mark.timeout(180)
def test_ddp_a_failure_on_one_process_skips_the_step_on_both(tmp_path: Path) -> None:
    callback = measuring(num_pairs=10, log_figures=False)
    trainer(
        tmp_path,
        callback,
        max_steps=4,
        devices=2,
        strategy="ddp_spawn",
        logger=CSVLogger(tmp_path),
        limit_val_batches=0,
    ).fit(FailsOnRankOneAt(2), datamodule=Blobs())
    assert sorted(read_csv_metrics(tmp_path)) == [0, 4]


class CountsForwards(Classifier):
    """Appends the size of every forward pass, with the process's rank, to a file."""

    def __init__(self, directory: str) -> None:
        super().__init__(lr=0.0)
        self.directory = directory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(Path(self.directory) / f"rank{self.global_rank}.txt", "a") as file:
            file.write(f"{'train' if self.training else 'eval'} {len(x)}\n")
        return super().forward(x)


class OddBatches(Blobs):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(blobs(98, 0), batch_size=16)  # 49 per process: 16, 16, 16, 1


@pytest.mark.timeout(180)
def test_ddp_every_process_runs_the_same_forward_passes_and_measures_its_own_share(tmp_path: Path) -> None:
    # 5 pairs on 2 processes: process 0 measures 3, process 1 measures 2 and one padding path; with figures (an
    # extra walk) and the regulariser (a batch of one sample at the end of an epoch of 49 samples per process).
    torch.manual_seed(0)
    single = measuring(num_pairs=5, steps=16, log_figures=False)
    trainer(tmp_path / "single", single, max_steps=2, logger=False).fit(Classifier(lr=0.0), datamodule=Blobs())

    torch.manual_seed(0)  # the single run's network; lr=0 keeps it
    model = CountsForwards(str(tmp_path))
    callback = measuring(num_pairs=5, steps=16, regularize=True, reg_pairs="batch", reg_num_pairs=4)
    trainer(
        tmp_path / "ddp",
        callback,
        max_steps=4,
        devices=2,
        strategy="ddp_spawn",
        logger=TensorBoardLogger(tmp_path / "ddp"),
        callbacks=[callback, SavesResult(callback, tmp_path)],
    ).fit(model, datamodule=OddBatches())
    calls = [(tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert calls[0] == calls[1]
    # 3 paths x 17 points at steps 0, 2 and 4, and the figures' walk at the first and the last measurement.
    assert calls[0].count("eval 51") == 5
    chi, r2 = zip(*(torch.load(tmp_path / f"result{rank}.pt") for rank in (0, 1)), strict=True)
    assert [len(values) for values in chi] == [3, 2]
    torch.testing.assert_close(torch.cat(chi), single.latest_result.chi)
    assert torch.equal(torch.cat(r2), single.latest_result.r2)
