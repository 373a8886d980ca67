"""The folding regulariser injected by SpaceFoldingCallback: exact gradients, accumulation, DDP, restoration."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_spacefold import SpaceFoldingCallback, soft_folding
from tests.test_callback import Blobs, Classifier, blobs, trainer

WEIGHT = 0.5


class GradientRecorder(Classifier):
    """Keeps the gradients of the first optimizer step; SGD with lr=0 keeps the weights."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__(lr=lr)
        self.gradients: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gradients is None:
            self.gradients = {name: p.grad.clone() for name, p in self.named_parameters()}


class Ordered(Blobs):
    """The training data in a fixed order, in batches of ``batch_size``; under DDP rank r gets samples r, r + 2, ..."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = blobs(96, 0)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # Lightning would put a shuffling DistributedSampler here; a sequential one keeps the split known.
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def regularizing(**kwargs) -> SpaceFoldingCallback:
    arguments = {
        "every_n_train_steps": 0,
        "measure_at_start": True,
        "num_pairs": 12,
        "steps": 8,
        "probe_size": 30,
        "log_figures": False,
        "log_histogram": False,
        "regularize": True,
        "reg_weight": WEIGHT,
        "reg_num_pairs": 6,
        "reg_steps": 8,
        "reg_pairs": "probe",
    }
    return SpaceFoldingCallback(**{**arguments, **kwargs})


def fit(tmp_path: Path, module: pl.LightningModule, callback: SpaceFoldingCallback, **kwargs) -> pl.Trainer:
    datamodule = kwargs.pop("datamodule", Ordered(16))
    fitted = trainer(tmp_path, callback, **{"max_steps": 1, "logger": False, "default_root_dir": tmp_path, **kwargs})
    fitted.fit(module, datamodule=datamodule)
    return fitted


def test_gradient_is_task_gradient_plus_weighted_surrogate_gradient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = GradientRecorder()
    initial = copy.deepcopy(module)
    callback = regularizing()
    fit(tmp_path, module, callback)

    x, y = next(iter(DataLoader(blobs(96, 0), batch_size=16)))
    task = nn.functional.cross_entropy(initial(x), y)
    pairs = callback._drawn
    surrogate = soft_folding(initial, pairs.starts[:6], pairs.ends[:6], steps=8).mean()
    parameters = list(initial.parameters())
    task_gradients = torch.autograd.grad(task, parameters)
    surrogate_gradients = torch.autograd.grad(-surrogate, parameters, allow_unused=True)
    for (name, _), task_gradient, surrogate_gradient in zip(
        initial.named_parameters(), task_gradients, surrogate_gradients, strict=True
    ):
        expected = task_gradient + WEIGHT * (0 if surrogate_gradient is None else surrogate_gradient)
        torch.testing.assert_close(module.gradients[name], expected, rtol=1e-5, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in surrogate_gradients), "the surrogate must matter"


def test_training_step_is_restored_after_the_fit(tmp_path: Path) -> None:
    module = Classifier()
    fit(tmp_path, module, regularizing())
    assert "training_step" not in module.__dict__


def test_training_step_is_restored_when_the_fit_fails(tmp_path: Path) -> None:
    class Failing(Classifier):
        def on_train_batch_end(self, *args) -> None:
            raise RuntimeError("boom")

    module = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, module, regularizing())
    assert "training_step" not in module.__dict__


def test_manual_optimisation_is_rejected_with_the_alternative(tmp_path: Path) -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            optimizer.step()

    with pytest.raises(ValueError, match="manual optimisation.*folding_penalty"):
        fit(tmp_path, Manual(), regularizing())


def test_weight_schedule_and_logged_term(tmp_path: Path) -> None:
    module = Classifier()
    callback = regularizing(reg_schedule="linear", reg_pairs="batch")
    trainer = fit(tmp_path, module, callback, max_steps=4, log_every_n_steps=1, logger=True)
    logged = trainer.logged_metrics
    # Linear decay over 4 steps: the last regularised step (3) has weight 0.5 * (1 - 3/4).
    assert logged["spacefold/reg_weight"].item() == pytest.approx(WEIGHT * 0.25)
    assert logged["spacefold/reg_term"].item() <= 0


def parameters_after_one_step(tmp_path: Path, batch_size: int, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = Classifier(lr=0.5)
    fit(tmp_path, module, regularizing(), datamodule=Ordered(batch_size), **kwargs)
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_gradient_accumulation_gives_the_same_update(tmp_path: Path) -> None:
    whole = parameters_after_one_step(tmp_path / "a", 16)
    accumulated = parameters_after_one_step(tmp_path / "b", 8, accumulate_grad_batches=2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)


def test_ddp_two_processes_give_the_same_update(tmp_path: Path) -> None:
    # Each rank's batch of 8 holds every other sample of the first 16; DDP averages the two ranks' gradients.
    single = parameters_after_one_step(tmp_path / "a", 16)
    distributed = parameters_after_one_step(tmp_path / "b", 8, devices=2, strategy="ddp_spawn")
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-5, atol=1e-6)


def test_a_batch_of_one_sample_adds_a_term_of_exactly_zero(tmp_path: Path) -> None:
    class Single(Blobs):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.utils.data.Subset(blobs(96, 0), [5]), batch_size=1)

    gradients, terms = [], []
    for callback in (None, regularizing(reg_pairs="batch")):
        torch.manual_seed(0)
        module = GradientRecorder()
        fitted = fit(tmp_path, module, callback, datamodule=Single())
        gradients.append(module.gradients)
        terms.append(fitted.callback_metrics.get("spacefold/reg_term"))
    # The term ran (so every process runs the same forward passes) and added nothing: zero-length paths.
    assert terms[0] is None and terms[1].item() == 0.0
    assert all(torch.equal(gradients[0][name], gradients[1][name]) for name in gradients[0])


def test_wrappers_can_be_removed_in_any_order() -> None:
    from lightning_spacefold.loss_term import TrainingLossTerm

    class Constant(Classifier):
        def training_step(self, batch, batch_idx):
            return torch.tensor(1.0)

    module = Constant()
    first = TrainingLossTerm(module, lambda _batch: torch.tensor(10.0))
    second = TrainingLossTerm(module, lambda _batch: torch.tensor(100.0))
    assert module.training_step(None, 0).item() == 111.0
    first.remove()
    assert module.training_step(None, 0).item() == 101.0
    second.remove()
    assert module.training_step(None, 0).item() == 1.0 and "training_step" not in module.__dict__
