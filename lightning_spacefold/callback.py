"""The Lightning callback: measure folding on a schedule while the network trains, and log it.

Layers, from the top: this callback chooses the probe set and the pairs, schedules and runs measurements through
:func:`~lightning_spacefold.path_folding` and :class:`~lightning_spacefold.SpaceFolding`, and hands the values to
the trainer's loggers; :mod:`lightning_spacefold.figures` draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from torchmetrics.utilities.data import dim_zero_cat

from lightning_spacefold.checks import is_int, is_real
from lightning_spacefold.figures import class_pair_figure, distance_figure, layer_figure
from lightning_spacefold.folding import discover_layers, path_folding, path_patterns, select_layers
from lightning_spacefold.loss_term import TrainingLossTerm
from lightning_spacefold.measure import fold_measure, step_distances
from lightning_spacefold.metric import SpaceFolding
from lightning_spacefold.regularization import SCHEDULES, folding_penalty, regularization_weight
from lightning_spacefold.result import FoldingResult
from lightning_spacefold.sampling import PairBatch, centroid_pairs, class_pairs, random_pairs

__all__ = ["SpaceFoldingCallback"]

PREFIX = "spacefold"
_PAIRINGS = ("auto", "random", "class", "centroid")
_SOURCES = ("val", "train")
_REG_PAIRS = ("batch", "probe")


class SpaceFoldingCallback(Callback):
    r"""Measure how the network folds its input space at regular optimizer steps, and log it.

    At the start of training the callback draws a probe set of inputs (from the validation data by default), pairs
    them up once, and from then on measures the folding of the straight segments between the pairs: at the start
    and every ``every_n_train_steps`` optimizer steps and/or every ``every_n_epochs`` epochs. A measurement runs the
    model in eval mode without gradients, under the trainer's precision, and leaves it exactly as it was (training
    flags, hooks, BatchNorm statistics, the training run's RNG state, autocast).

    Logged at the step of the measurement through every logger of the trainer, whatever ``log_every_n_steps``:
    ``spacefold/folding`` (mean chi), ``spacefold/folding_median_nonzero`` (median of the non-zero chi),
    ``spacefold/folded_fraction`` (share of paths with chi > 0) and ``spacefold/layer/<layer name>``. With a
    TensorBoard logger also a histogram of the per-path chi (``spacefold/chi``), figures (``spacefold/example_paths``:
    Hamming distance from the start along a few paths; ``spacefold/class_pairs``: mean chi per pair of classes;
    ``spacefold/layers``: mean chi per layer) and a custom-scalars layout that puts the global and per-layer curves
    side by side. After each measurement the values are also in :attr:`latest_metrics` (and the step in
    :attr:`latest_step`, this process's paths in :attr:`latest_result`).

    Under DDP every process draws the same probe set and pairs, measures its share of the pairs, and the metric's
    states are synchronised, so the logged values equal those of a single process.

    The model is called as ``pl_module(inputs)`` on a batch of probe inputs.

    With ``regularize=True`` the callback also adds ``-reg_weight * mean soft folding`` of ``reg_num_pairs`` paths
    (:func:`~lightning_spacefold.soft_folding`) to the loss that ``training_step`` returns, every
    ``reg_every_n_steps`` optimizer steps, so that it reaches the parameters through Lightning's normal backward
    (mixed precision, gradient accumulation, clipping and DDP all apply). The term is logged as
    ``spacefold/reg_term`` and its weight as ``spacefold/reg_weight``; ``training_step`` is restored at the end of the
    fit. Manual optimisation is rejected: use :func:`~lightning_spacefold.folding_penalty` in your own step.

    Args:
        every_n_train_steps: Measure every this many optimizer steps (``trainer.global_step``; with gradient
            accumulation that is once per accumulated step). ``None`` or 0 to measure by epochs only.
        every_n_epochs: Measure at the end of every this many training epochs. ``None`` or 0 to measure by steps only.
        measure_at_start: Also measure before the first optimizer step, so that each curve has its starting point.
            Not repeated when a fit resumes from a checkpoint.
        num_pairs: Number of paths per measurement for ``random`` and ``class`` pairing. ``centroid`` pairing uses
            every pair of class centroids instead.
        steps: Segments per path (``steps + 1`` points); ignored with ``exact``.
        exact: Traverse the exact sequence of regions along each path (piecewise-linear networks) instead of
            sampling ``steps + 1`` points.
        layers: Names of the activation layers to measure; all by default. The names are listed in the error
            raised for an unknown one.
        pairing: How the probe inputs are paired: ``random`` pairs, ``class`` pairs balanced over every ordered pair
            of classes, ``centroid`` pairs between the k-means centroids of each class (the papers' efficient
            strategy), or ``auto``: ``class`` when the probe set has labels, else ``random``.
        include_same_class: With ``class`` and ``centroid`` pairing, also pair a class with itself.
        centroids_per_class: k-means centroids per class for ``centroid`` pairing.
        probe_source: Where the probe set comes from when ``probe_dataset`` is not given: ``val`` (the first
            validation dataloader's dataset; when the fit has no validation data, the training data is used with a
            warning) or ``train``.
        probe_dataset: A dataset to draw the probe set from instead; its items are collated with ``default_collate``.
        probe_size: Number of probe inputs, drawn without replacement with ``seed`` (all of them if fewer).
        input_key: Where the inputs are in a batch: an index for tuple/list batches, a key for dict batches.
        label_key: Where the class labels are in a batch (an index or a key), or ``None`` for no labels.
        batch_size: Points per forward pass during a measurement; chosen from the model by default.
        log_histogram: Log a histogram of the per-path chi (TensorBoard).
        log_figures: Log the figures (TensorBoard). They are built on rank 0 only.
        num_example_paths: Number of paths in the ``example_paths`` figure: the most folded ones of the measurement
            (of process 0's share under DDP), sampled at ``steps`` points.
        seed: Seed of the probe set and the pairs; the training run's RNG is not touched.
        regularize: Add the folding regulariser to the training loss.
        reg_weight: Weight lambda of the regulariser (total loss = task loss - lambda * soft folding).
        reg_schedule: How the weight changes over training: ``constant``, or ``linear`` / ``cosine`` decay to zero.
        reg_until: Fraction of the training's optimizer steps at which the weight reaches zero (``linear``,
            ``cosine``) or stops (``constant``, when below 1).
        reg_every_n_steps: Add the term every this many optimizer steps (all accumulated batches of such a step).
        reg_num_pairs: Paths per regularisation step.
        reg_steps: Segments per regularisation path.
        reg_temperature: Temperature of the soft bits, relative to each layer's pre-activation spread.
        reg_pairs: Where the regularisation paths come from: ``batch`` (random pairs of the current training
            batch, drawn with ``seed``) or ``probe`` (the first ``reg_num_pairs`` measurement pairs, the same on
            every process and at every step).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = 50,
        every_n_epochs: int | None = None,
        measure_at_start: bool = True,
        num_pairs: int = 64,
        steps: int = 64,
        exact: bool = False,
        layers: list[str] | None = None,
        pairing: Literal["auto", "random", "class", "centroid"] = "auto",
        include_same_class: bool = True,
        centroids_per_class: int = 5,
        probe_source: Literal["val", "train"] = "val",
        probe_dataset: Dataset | None = None,
        probe_size: int = 512,
        input_key: int | str = 0,
        label_key: int | str | None = 1,
        batch_size: int | None = None,
        log_histogram: bool = True,
        log_figures: bool = True,
        num_example_paths: int = 4,
        seed: int = 0,
        regularize: bool = False,
        reg_weight: float = 0.01,
        reg_schedule: Literal["constant", "linear", "cosine"] = "constant",
        reg_until: float = 1.0,
        reg_every_n_steps: int = 1,
        reg_num_pairs: int = 16,
        reg_steps: int = 16,
        reg_temperature: float = 0.1,
        reg_pairs: Literal["batch", "probe"] = "batch",
    ) -> None:
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and not is_int(value, minimum=0):
                raise ValueError(f"`{name}` must be None or an integer >= 0, got {value!r}.")
        if not (every_n_train_steps or every_n_epochs or measure_at_start):
            raise ValueError(
                "The callback would never measure: set `every_n_train_steps` or `every_n_epochs` to a positive "
                "integer, or `measure_at_start=True`."
            )
        for name, value, minimum in (
            ("num_pairs", num_pairs, 1),
            ("steps", steps, 1),
            ("centroids_per_class", centroids_per_class, 1),
            ("probe_size", probe_size, 2),
            ("num_example_paths", num_example_paths, 1),
            ("reg_every_n_steps", reg_every_n_steps, 1),
            ("reg_num_pairs", reg_num_pairs, 1),
            ("reg_steps", reg_steps, 1),
        ):
            if not is_int(value, minimum):
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        if batch_size is not None and not is_int(batch_size, 1):
            raise ValueError(f"`batch_size` must be None or an integer >= 1, got {batch_size!r}.")
        if pairing not in _PAIRINGS:
            raise ValueError(f"`pairing` must be one of {_PAIRINGS}, got {pairing!r}.")
        if probe_source not in _SOURCES:
            raise ValueError(f"`probe_source` must be one of {_SOURCES}, got {probe_source!r}.")
        if probe_dataset is not None and not isinstance(probe_dataset, Dataset):
            raise TypeError(f"`probe_dataset` must be a torch Dataset, got {type(probe_dataset).__name__}.")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(name, str) for name in layers)):
            raise TypeError(f"`layers` must be None or a list of layer names, got {layers!r}.")
        for name, value in (("input_key", input_key), ("label_key", label_key)):
            if not (isinstance(value, str) or is_int(value, 0) or (value is None and name == "label_key")):
                raise TypeError(f"`{name}` must be a batch index (int >= 0) or a dict key (str), got {value!r}.")
        if not is_int(seed, 0):
            raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}.")
        if not is_real(reg_weight, 0):
            raise ValueError(f"`reg_weight` must be a finite number >= 0, got {reg_weight!r}.")
        if reg_schedule not in SCHEDULES:
            raise ValueError(f"`reg_schedule` must be one of {SCHEDULES}, got {reg_schedule!r}.")
        if not (is_real(reg_until, 0, strict=True) and reg_until <= 1):
            raise ValueError(f"`reg_until` must be a fraction of training in (0, 1], got {reg_until!r}.")
        if not is_real(reg_temperature, 0, strict=True):
            raise ValueError(f"`reg_temperature` must be a finite number > 0, got {reg_temperature!r}.")
        if reg_pairs not in _REG_PAIRS:
            raise ValueError(f"`reg_pairs` must be one of {_REG_PAIRS}, got {reg_pairs!r}.")

        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs or 0
        self.measure_at_start = measure_at_start
        self.num_pairs = num_pairs
        self.steps = steps
        self.exact = exact
        self.layers = None if layers is None else list(layers)
        self.pairing = pairing
        self.include_same_class = include_same_class
        self.centroids_per_class = centroids_per_class
        self.probe_source = probe_source
        self.probe_dataset = probe_dataset
        self.probe_size = probe_size
        self.input_key = input_key
        self.label_key = label_key
        self.batch_size = batch_size
        self.log_histogram = log_histogram
        self.log_figures = log_figures
        self.num_example_paths = num_example_paths
        self.seed = seed
        self.regularize = regularize
        self.reg_weight = reg_weight
        self.reg_schedule = reg_schedule
        self.reg_until = reg_until
        self.reg_every_n_steps = reg_every_n_steps
        self.reg_num_pairs = reg_num_pairs
        self.reg_steps = reg_steps
        self.reg_temperature = reg_temperature
        self.reg_pairs = reg_pairs

        self.latest_metrics: dict[str, float] = {}
        self.latest_step: int | None = None
        self.latest_result: FoldingResult | None = None
        self._pairs: PairBatch | None = None
        self._metric: SpaceFolding | None = None
        self._loss_term: TrainingLossTerm | None = None

    @property
    def state_key(self) -> str:
        """Key of the callback's state in a checkpoint: distinct for every measuring configuration."""
        return self._generate_state_key(
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
            num_pairs=self.num_pairs,
            steps=self.steps,
            exact=self.exact,
            layers=self.layers,
            pairing=self.pairing,
            include_same_class=self.include_same_class,
            centroids_per_class=self.centroids_per_class,
            probe_source=self.probe_source,
            probe_dataset=None if self.probe_dataset is None else type(self.probe_dataset).__name__,
            probe_size=self.probe_size,
            input_key=self.input_key,
            label_key=self.label_key,
            seed=self.seed,
            regularize=self.regularize,
            reg_pairs=self.reg_pairs,
            reg_num_pairs=self.reg_num_pairs,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget the pairs of a previous fit (a checkpoint restored afterwards brings its own)."""
        if stage == "fit":
            self._pairs, self.latest_step = None, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the probe set and pairs, check the model's layers, and take the first measurement."""
        if self._pairs is None:
            with _preserved_rng(pl_module.device):
                pairs = self._draw_pairs(trainer)
            # Every process measures the same pairs, also when an iterable dataset is sharded by process.
            self._pairs = trainer.strategy.broadcast(pairs, src=0)
        labels = self._pairs.start_labels
        num_classes = None if labels is None else int(torch.cat([labels, self._pairs.end_labels]).max()) + 1
        # A model without supported activations, or an unknown layer name, fails here rather than mid-training.
        first = slice(0, 1)
        found = discover_layers(
            pl_module,
            self._inputs(trainer, pl_module, self._pairs.starts[first]),
            self._inputs(trainer, pl_module, self._pairs.ends[first]),
        )
        names = [found[index].name for index in select_layers(pl_module, [layer.name for layer in found], self.layers)]
        self._metric = SpaceFolding(num_classes=num_classes).to(pl_module.device)
        if not trainer.loggers:
            rank_zero_warn(
                "SpaceFoldingCallback: the trainer has no logger; measurements are only kept on the callback "
                "(`latest_metrics`). Pass a logger, e.g. `Trainer(logger=TensorBoardLogger(...))`, to record curves."
            )
        self._add_custom_scalars(trainer, names)
        if self.regularize:
            self._regularization_weight(trainer)  # an unknown run length fails now if the schedule needs it
            self._loss_term = TrainingLossTerm(
                pl_module, lambda batch: self._regularization_term(trainer, pl_module, batch)
            )
        if self.measure_at_start and self.latest_step is None:
            self._measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure when ``every_n_train_steps`` optimizer steps have passed since the last measurement."""
        step = trainer.global_step
        # Step 0 belongs to the start measurement; with gradient accumulation it lasts several batches.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self.latest_step:
            self._measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure every ``every_n_epochs`` epochs, unless this step was just measured."""
        epoch_due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if epoch_due and trainer.global_step != self.latest_step:
            self._measure(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own ``training_step`` back."""
        self._remove_loss_term()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the module its own ``training_step`` back, also when the fit fails."""
        self._remove_loss_term()

    def state_dict(self) -> dict[str, Any]:
        """The pairs (so that a resumed fit measures the same paths) and the step of the last measurement."""
        pairs = self._pairs
        return {
            "starts": None if pairs is None else pairs.starts,
            "ends": None if pairs is None else pairs.ends,
            "start_labels": None if pairs is None else pairs.start_labels,
            "end_labels": None if pairs is None else pairs.end_labels,
            "latest_step": self.latest_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pairs and the step of the last measurement."""
        if state_dict["starts"] is not None:
            self._pairs = PairBatch(
                state_dict["starts"], state_dict["ends"], state_dict["start_labels"], state_dict["end_labels"]
            )
        self.latest_step = state_dict["latest_step"]

    # --- the probe set and the pairs ----------------------------------------------------------------------------

    def _draw_pairs(self, trainer: pl.Trainer) -> PairBatch:
        inputs, labels = self._probe(trainer)
        generator = torch.Generator().manual_seed(self.seed)
        pairing = self.pairing if self.pairing != "auto" else ("class" if labels is not None else "random")
        if pairing != "random" and labels is None:
            raise ValueError(
                f"pairing={pairing!r} needs class labels, but the probe batches have none at label_key="
                f"{self.label_key!r}. Set `label_key` to where the labels are, or use pairing='random'."
            )
        if pairing == "random":
            return random_pairs(inputs, self.num_pairs, labels=labels, generator=generator)
        if pairing == "class":
            return class_pairs(
                inputs, labels, self.num_pairs, include_same_class=self.include_same_class, generator=generator
            )
        return centroid_pairs(
            inputs,
            labels,
            self.centroids_per_class,
            include_same_class=self.include_same_class,
            generator=generator,
        )

    def _probe(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor | None]:
        """Probe inputs and labels, identical on every process and for any number of processes."""
        if self.probe_dataset is not None:
            batch = _draw(self.probe_dataset, default_collate, self.probe_size, self.seed)
        else:
            loader = self._source_loader(trainer)
            batch = _draw(loader.dataset, loader.collate_fn or default_collate, self.probe_size, self.seed, loader)
        return self._split(batch)

    def _source_loader(self, trainer: pl.Trainer) -> DataLoader:
        if self.probe_source == "val":
            if trainer.val_dataloaders is None and trainer.enable_validation:
                # Lightning sets the validation data up lazily when the first epoch does not validate.
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
                trainer.training = True
            loader = _first_loader(trainer.val_dataloaders)
            if loader is not None:
                return loader
            rank_zero_warn(
                "SpaceFoldingCallback: the fit has no validation data, so the probe set is drawn from the training "
                "data. Pass `probe_source='train'` to say so, or `probe_dataset=...` to choose the inputs."
            )
        loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            raise ValueError(
                "SpaceFoldingCallback found no dataloader to draw the probe set from; pass `probe_dataset`."
            )
        return loader

    def _split(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            inputs, labels = batch, None
        elif isinstance(batch, Mapping):
            if self.input_key not in batch:
                raise ValueError(
                    f"The probe batches are dicts with keys {sorted(batch)}; set `input_key` (and `label_key`) to "
                    f"the keys of the inputs and labels (input_key={self.input_key!r} is not one of them)."
                )
            inputs = batch[self.input_key]
            labels = batch.get(self.label_key) if self.label_key is not None else None
        elif isinstance(batch, Sequence) and not isinstance(batch, str):
            if not isinstance(self.input_key, int) or self.input_key >= len(batch):
                raise ValueError(
                    f"The probe batches are sequences of {len(batch)} items; set `input_key` (and `label_key`) to "
                    f"the positions of the inputs and labels, got input_key={self.input_key!r}."
                )
            inputs = batch[self.input_key]
            use_labels = isinstance(self.label_key, int) and self.label_key < len(batch)
            labels = batch[self.label_key] if use_labels else None
        else:
            raise TypeError(
                f"SpaceFoldingCallback cannot read probe batches of type {type(batch).__name__}; batches must be a "
                "tensor, a tuple/list or a dict."
            )
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError(
                f"The probe inputs at input_key={self.input_key!r} must be a floating-point tensor, got "
                f"{getattr(inputs, 'dtype', type(inputs).__name__)}. Set `input_key` to where the inputs are."
            )
        if labels is not None and (not isinstance(labels, Tensor) or labels.is_floating_point() or labels.ndim != 1):
            rank_zero_warn(
                f"SpaceFoldingCallback: the batch item at label_key={self.label_key!r} is not a 1-D integer tensor "
                "of class labels, so the probe set has no labels. Set `label_key=None` to silence this."
            )
            labels = None
        return inputs, labels

    # --- regularisation ----------------------------------------------------------------------------------------

    def _regularization_weight(self, trainer: pl.Trainer) -> float:
        total = trainer.estimated_stepping_batches
        return regularization_weight(
            trainer.global_step,
            total if math.isfinite(total) and total >= 1 else math.inf,
            self.reg_weight,
            self.reg_schedule,
            self.reg_until,
        )

    def _regularization_term(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        step = trainer.global_step
        weight = self._regularization_weight(trainer)
        if step % self.reg_every_n_steps or weight == 0:
            return None
        if self.reg_pairs == "probe":
            assert self._pairs is not None
            few = slice(0, self.reg_num_pairs)
            starts = self._inputs(trainer, pl_module, self._pairs.starts[few])
            ends = self._inputs(trainer, pl_module, self._pairs.ends[few])
        else:
            inputs = self._split(batch)[0]
            if len(inputs) < 2:  # a last batch of one sample has no pair
                return None
            # Seeded by step and process: reproducible, and a resumed fit draws what an uninterrupted one would.
            generator = torch.Generator().manual_seed(hash((self.seed, trainer.global_rank, step)) % 2**62)
            pairs = random_pairs(inputs, self.reg_num_pairs, generator=generator)
            starts, ends = pairs.starts, pairs.ends
        term = folding_penalty(
            pl_module, starts, ends, weight, steps=self.reg_steps, temperature=self.reg_temperature, layers=self.layers
        )
        pl_module.log(f"{PREFIX}/reg_term", term.detach().float(), on_step=True, on_epoch=False)
        pl_module.log(f"{PREFIX}/reg_weight", float(weight), on_step=True, on_epoch=False)
        return term

    @staticmethod
    def _inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        """Probe inputs as the model takes them: on its device, in the precision's dtype (e.g. ``bf16-true``)."""
        return trainer.precision_plugin.convert_input(inputs.to(pl_module.device))

    def _remove_loss_term(self) -> None:
        if self._loss_term is not None:
            self._loss_term.remove()
            self._loss_term = None

    # --- measuring and logging ---------------------------------------------------------------------------------

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._pairs is not None and self._metric is not None
        device = pl_module.device
        share = torch.arange(len(self._pairs)).tensor_split(trainer.world_size)[trainer.global_rank]
        starts = self._inputs(trainer, pl_module, self._pairs.starts[share])
        ends = self._inputs(trainer, pl_module, self._pairs.ends[share])
        self._metric.reset()
        # The trainer's precision measures the network as it trains; the RNG is preserved whatever the model's
        # forward does in eval mode. A process without pairs (fewer pairs than processes) still joins the sync.
        result = None
        if len(share) > 0:
            with _preserved_rng(device), trainer.precision_plugin.forward_context():
                result = path_folding(
                    pl_module,
                    starts,
                    ends,
                    steps=self.steps,
                    layers=self.layers,
                    batch_size=self.batch_size,
                    exact=self.exact,
                )
            labels = self._pairs.start_labels
            self._metric.update_from_result(
                result,
                None if labels is None else labels[share].to(device),
                None if labels is None else self._pairs.end_labels[share].to(device),
            )
        values = self._metric.compute()
        with self._metric.sync_context():
            all_chi = dim_zero_cat(self._metric.chi).clone()
        step = trainer.global_step
        scalars = {f"{PREFIX}/{name}": value.item() for name, value in values.items() if value.ndim == 0}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        layer_names = [name.removeprefix("layer/") for name in values if name.startswith("layer/")]
        self._log_tensorboard(trainer, pl_module, values, all_chi, layer_names, step, share, result)
        self.latest_metrics, self.latest_step, self.latest_result = scalars, step, result

    @rank_zero_only
    def _log_tensorboard(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        values: dict[str, Tensor],
        all_chi: Tensor,
        layer_names: list[str],
        step: int,
        share: Tensor,
        result: FoldingResult | None,
    ) -> None:
        boards = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not boards or not (self.log_histogram or self.log_figures):
            return
        figures = {}
        if self.log_figures and result is not None:
            assert self._pairs is not None
            # The most folded of this process's paths: most paths of a network do not fold at all.
            few = share[result.chi.argsort(descending=True, stable=True)[: self.num_example_paths].cpu()]
            device = pl_module.device
            with _preserved_rng(device), trainer.precision_plugin.forward_context():
                patterns = path_patterns(
                    pl_module,
                    self._inputs(trainer, pl_module, self._pairs.starts[few]),
                    self._inputs(trainer, pl_module, self._pairs.ends[few]),
                    steps=self.steps,
                    layers=self.layers,
                )
            from_start, from_previous = step_distances(patterns, patterns[:, 0])
            figures["example_paths"] = distance_figure(from_start, from_previous.cumsum(-1), fold_measure(patterns))
            figures["layers"] = layer_figure(layer_names, torch.stack([values[f"layer/{n}"] for n in layer_names]))
            if "class_pair_folding" in values:
                figures["class_pairs"] = class_pair_figure(values["class_pair_folding"])
        for board in boards:
            if self.log_histogram:
                board.add_histogram(f"{PREFIX}/chi", all_chi.float().cpu(), step)
            for name, figure in figures.items():
                board.add_figure(f"{PREFIX}/{name}", figure, step, close=False)

    @rank_zero_only
    def _add_custom_scalars(self, trainer: pl.Trainer, layer_names: list[str]) -> None:
        layout = {
            PREFIX: {
                "global": [
                    "Multiline",
                    [f"{PREFIX}/folding", f"{PREFIX}/folding_median_nonzero", f"{PREFIX}/folded_fraction"],
                ],
                "layers": ["Multiline", [f"{PREFIX}/layer/{name}" for name in layer_names]],
            }
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(layout)


def _first_loader(loaders: Any) -> DataLoader | None:
    """The first DataLoader of whatever Lightning holds (a loader, a list or a dict of them)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence):
        return next((loader for loader in map(_first_loader, loaders) if loader is not None), None)
    return None


def _draw(dataset: Any, collate: Any, size: int, seed: int, loader: DataLoader | None = None) -> Any:
    """``size`` items drawn without replacement with ``seed``, collated into one batch.

    Map-style datasets are indexed directly, so the draw does not depend on the loader's sampler (shuffling,
    distributed sampling) or on the number of processes. Iterable datasets are read in order from their loader.
    """
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:size]
        return collate([dataset[index] for index in indices.tolist()])
    if loader is None:
        raise TypeError("`probe_dataset` must be a map-style dataset (with __len__ and __getitem__).")
    batches, count = [], 0
    for batch in loader:
        batches.append(batch)
        first = _first_tensor(batch)
        if first is None:
            raise TypeError(f"SpaceFoldingCallback found no tensor in a probe batch of type {type(batch).__name__}.")
        count += len(first)
        if count >= size:
            break
    return _concatenate(batches, size)


def _first_tensor(batch: Any) -> Tensor | None:
    """The first tensor in a batch of nested tuples, lists and dicts (for its length), or ``None``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
        return None
    return next((tensor for tensor in map(_first_tensor, batch) if tensor is not None), None)


def _concatenate(batches: list[Any], size: int) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)[:size]
    if isinstance(first, Mapping):
        return {key: _concatenate([batch[key] for batch in batches], size) for key in first}
    if isinstance(first, Sequence):
        return [_concatenate([batch[index] for batch in batches], size) for index in range(len(first))]
    return first


@contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Run the block without touching the training run's random state: torch (CPU and the device), Python, NumPy."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
