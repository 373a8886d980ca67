"""Measuring trained models: trainer.validate / trainer.test, checkpoints, the CLI, and resuming a failed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_spacefold import SpaceFoldingCallback, path_folding
from tests.test_callback import Blobs, Classifier, events, scalar_steps, trainer
from tests.test_examples import EXAMPLES, load

# Two points per split, of classes 0 and 1: class pairing without same-class pairs gives the paths a -> b and b -> a.
# Through Classifier() after torch.manual_seed(0) both ways fold: chi = 1/7 between the validation points, 0.3 between
# the test points.
VALIDATION = torch.tensor([[3.0] * 8, [-3.0] * 8])
TEST = torch.tensor([[3.0, -3.0] * 4, [3.0, -3.0, -3.0, 3.0] * 2])


class TwoPoints(Blobs):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(VALIDATION, torch.tensor([0, 1])), batch_size=2)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(TEST, torch.tensor([0, 1])), batch_size=2)


def evaluating() -> SpaceFoldingCallback:
    return SpaceFoldingCallback(num_pairs=2, steps=64, pairing="class", include_same_class=False, probe_size=2)


def both_ways(model: torch.nn.Module, points: torch.Tensor) -> list[float]:
    """Sorted chi of the two paths between the points (the pairing's order is its own)."""
    return sorted(path_folding(model, points, points.flip(0), steps=64).chi.tolist())


@pytest.mark.parametrize(("stage", "points"), [("validate", VALIDATION), ("test", TEST)])
def test_evaluation_measures_once_on_its_own_data(tmp_path: Path, stage: str, points: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Classifier()
    callback = evaluating()
    getattr(trainer(tmp_path, callback), stage)(model, datamodule=TwoPoints())
    assert callback.latest_step == 0
    assert sorted(callback.latest_result.chi.tolist()) == both_ways(model, points)
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(sum(both_ways(model, points)) / 2)
    assert both_ways(model, points) == pytest.approx([1 / 7] * 2 if stage == "validate" else [0.3] * 2)
    logged = tmp_path / "tb" / "version_0"
    assert scalar_steps(logged, "spacefold/folding") == [0]
    assert "spacefold/chi" in events(logged).Tags()["histograms"]
    callback.wait_for_figures()
    assert [event.step for event in events(logged / "figures").Images("spacefold/example_paths")] == [0]


def test_a_checkpoint_is_measured_at_its_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer(tmp_path / "fit", None, max_steps=5, callbacks=[checkpoint], enable_checkpointing=True).fit(
        Classifier(), datamodule=Blobs()
    )
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    callback = evaluating()
    torch.manual_seed(1)  # a fresh model, whose weights the checkpoint replaces
    trainer(tmp_path, callback).validate(Classifier(), datamodule=TwoPoints(), ckpt_path=str(path))
    assert callback.latest_step == 5
    assert scalar_steps(tmp_path / "tb" / "version_0", "spacefold/folding") == [5]
    trained = Classifier.load_from_checkpoint(path)
    assert sorted(callback.latest_result.chi.tolist()) == both_ways(trained, VALIDATION)
    # The step was the checkpoint's: a plain validate with the same callback logs at its own trainer's step, 0.
    trainer(tmp_path / "plain", callback).validate(trained, datamodule=TwoPoints())
    assert callback.latest_step == 0
    assert scalar_steps(tmp_path / "plain" / "tb" / "version_0", "spacefold/folding") == [0]


def test_the_cli_validates_a_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(EXAMPLES / "config.yaml")
    quick = ["--trainer.enable_progress_bar=false", "--trainer.callbacks.steps=8"]
    load("train").main(["fit", "--config", config, "--trainer.max_steps=3", *quick])
    path = next(Path("runs/digits/version_0/checkpoints").glob("*.ckpt"))
    cli = load("train").main(["validate", "--config", config, "--ckpt_path", str(path), *quick])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, SpaceFoldingCallback))
    assert callback.latest_step == 3 and len(callback.latest_result) == 810
    assert scalar_steps(Path("runs/digits/version_1"), "spacefold/folding") == [3]
    assert "Folding at step 3:" in capsys.readouterr().out


class FailsToMeasureAt(Classifier):
    """The measurement at ``step`` dies in the model's forward (as if the process were killed there)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.fail_at = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.global_step == self.fail_at and len(x) > 2:
            raise RuntimeError("killed mid-measurement")
        return super().forward(x)


def make_resumable(**kwargs) -> SpaceFoldingCallback:
    return SpaceFoldingCallback(every_n_train_steps=2, num_pairs=6, steps=8, probe_size=20, log_figures=False, **kwargs)


def test_a_run_killed_mid_measurement_resumes_the_same_curve(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = make_resumable(on_error="raise")
    model = FailsToMeasureAt(4)
    with pytest.raises(RuntimeError, match="killed mid-measurement"):
        trainer(tmp_path, first, max_steps=8, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
            model, datamodule=Blobs()
        )
    assert model.training and not any(module._forward_hooks for module in model.modules())
    second = make_resumable()
    # Other validation data: the pairs can only come from the checkpoint, not from drawing them again.
    trainer(tmp_path, second, max_steps=8).fit(
        Classifier(), datamodule=Blobs(validation_seed=2), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    )
    assert scalar_steps(tmp_path / "tb" / "version_0", "spacefold/folding") == [0, 2, 4, 6, 8]
    assert torch.equal(second._drawn.starts, first._drawn.starts) and len(second.latest_result) == 6
