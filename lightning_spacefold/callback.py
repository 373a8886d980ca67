"""The Lightning callback: when to measure folding, on which pairs, and what to do with the values.

The callback is the story of a run: it draws the probe set and its pairs (:mod:`~lightning_spacefold.probe`),
measures on a schedule during a fit and once at the end of ``trainer.validate`` / ``trainer.test``, through
:func:`~lightning_spacefold.path_folding` and :class:`~lightning_spacefold.SpaceFolding`, keeps a failed measurement
from ending the run (:mod:`~lightning_spacefold.safeguard`), hands the values to the trainer's loggers and the
TensorBoard views (:mod:`~lightning_spacefold.views`), and adds the regulariser to the loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import MethodType
from typing import Any, Literal, TypeAlias

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics.utilities.data import dim_zero_cat

from lightning_spacefold.capture import evaluation_mode
from lightning_spacefold.checks import is_int, is_real
from lightning_spacefold.figure_process import FigureProcess
from lightning_spacefold.folding import (
    Forward,
    default_batch_size,
    discover_layers,
    path_folding,
    path_patterns,
    select_layers,
)
from lightning_spacefold.loss_term import TrainingLossTerm
from lightning_spacefold.metric import SpaceFolding
from lightning_spacefold.probe import (
    PAIRINGS,
    PROBE_SOURCES,
    ProbeSet,
    draw_probe,
    pair_probe,
    probe_loader,
    split_batch,
)
from lightning_spacefold.regularization import SCHEDULES, folding_penalty, regularization_weight
from lightning_spacefold.result import FoldingResult
from lightning_spacefold.safeguard import (
    FailureReporter,
    agree_on_failures,
    halved,
    is_out_of_memory,
    with_memory_backoff,
)
from lightning_spacefold.sampling import PairBatch, random_pairs
from lightning_spacefold.views import (
    PREFIX,
    add_custom_scalars,
    figure_views,
    has_tensorboard,
    log_histogram,
    tensorboard_dirs,
)

__all__ = ["SpaceFoldingCallback"]

_REG_PAIRS = ("batch", "probe")
_ON_ERROR = ("warn", "raise")
# Strategies that gather parameters in every forward pass: all processes must run the same forward passes.
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

ModuleFunction: TypeAlias = Callable[[pl.LightningModule, Tensor], Tensor]
"""A function of the LightningModule and a batch, as ``embedding_fn`` and ``forward_fn`` take from Python."""


class SpaceFoldingCallback(Callback):
    r"""Measure how the network folds its input space at regular optimizer steps, and log it.

    At the start of training the callback draws a probe set of inputs (from the validation data by default), pairs
    them up once, and from then on measures the folding of the straight segments between the pairs: at the start
    and every ``every_n_train_steps`` optimizer steps and/or every ``every_n_epochs`` epochs. A measurement runs the
    model in eval mode without gradients, under the trainer's precision, and leaves it exactly as it was (training
    flags, hooks, BatchNorm statistics, the training run's RNG state, autocast).

    Logged at the step of the measurement through every logger of the trainer, whatever ``log_every_n_steps``:
    ``spacefold/folding`` (mean chi), ``spacefold/folding_median_nonzero`` (median of the non-zero chi),
    ``spacefold/folded_fraction`` (share of paths with chi > 0), ``spacefold/folding_max`` and
    ``spacefold/folding_max_median_nonzero`` (mean and median of the non-zero maximal folding over each path's
    prefixes, ``chi_max``: the papers' "median of maxima"), ``spacefold/layer/<layer name>`` and
    ``spacefold/layer_max/<layer name>``. With a
    TensorBoard logger also a histogram of the per-path chi (``spacefold/chi``), figures (``spacefold/example_paths``:
    Hamming distance from the start along a few paths; ``spacefold/class_pairs``: mean chi per pair of classes;
    ``spacefold/layers``: mean chi per layer) and a custom-scalars layout that puts the global and per-layer curves
    side by side. The figures are drawn by a child process while training goes on and written to the ``figures``
    folder of the logger's directory (a run of its own in TensorBoard); :meth:`wait_for_figures` waits for them.
    After each measurement the values are also in :attr:`latest_metrics` (and the step in
    :attr:`latest_step`, this process's paths in :attr:`latest_result`).

    Measuring a trained model: with ``trainer.validate(...)`` and ``trainer.test(...)`` (also the CLI's ``validate``
    and ``test`` subcommands with ``--ckpt_path``) the callback measures once at the end of the loop, on a probe set
    drawn from that loop's dataloader (or ``probe_dataset``), and logs everything above at the model's global step
    (the checkpoint's step when one is loaded). The validation inside ``fit`` measures only on the schedule.

    Failures: a measurement never ends the run by default (``on_error="warn"``). An out-of-memory error is retried
    with half the points per forward pass, down to one path's points, and the batch size that worked is kept (and
    reported once). A measurement that still fails, or finds NaN or infinite values in the network (a diverged
    run), is reported once per distinct error with a warning and skipped: nothing is logged for that step, the
    ``latest_*`` attributes keep the previous measurement, the model is left as it was, and training goes on.
    Configuration errors (no supported activation, an unknown layer, unreadable probe data) always raise, at the
    start of the fit or evaluation.

    Under DDP every process draws the same probe set and pairs, measures its share of the pairs, and the metric's
    states are synchronised, so the logged values equal those of a single process. All processes agree (one small
    collective) whether a measurement succeeded everywhere before they synchronise, so a failure on one process
    skips the step on all of them. Every process runs the same number of forward passes of the same size (shares
    are padded with repeated paths whose results are dropped), as strategies that gather sharded parameters in
    every forward pass (FSDP, DeepSpeed ZeRO-3) need; under them an out-of-memory error is not retried on one
    process alone (it skips the step, and all processes measure with half the points from the next one), and
    ``exact=True``, whose forward passes depend on the data, is rejected.

    The model is called as ``pl_module(inputs)`` on a batch of probe inputs. Token models, whose inputs are integer
    ids, are measured along paths between the embeddings of two inputs: ``embedding_fn`` names the module's method
    that embeds a batch of probe inputs, ``forward_fn`` the one that maps embeddings to outputs. The probe set is
    then embedded by the current model at every measurement and paired in the embedding space (random and class
    pairs are the same inputs every time; centroid pairs are the k-means centroids of the current embeddings), and
    the regulariser and figures work in that space too.

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
        log_figures: Log the figures (TensorBoard). Process 0 hands them to a child process that draws them (where
            none can run, it draws them itself, with a warning).
        figures_every_n_measurements: During a fit, draw the figures at every this many measurements (counting from
            the first) and at the last one (the fit's last step, or the last that ``every_n_train_steps`` reaches);
            an evaluation always draws them. Drawing the three figures takes about 0.2 s of a CPU core beside
            training.
        num_example_paths: Number of paths in the ``example_paths`` figure: the most folded ones of the measurement
            (of process 0's share under DDP), sampled at ``steps`` points.
        seed: Seed of the probe set and the pairs; the training run's RNG is not touched.
        embedding_fn: Name of the LightningModule's method that maps a batch of probe inputs (e.g. token ids
            ``[B, T]``) to the floating-point tensors between which paths run (e.g. embeddings ``[B, T, D]``), or
            from Python a callable ``(module, inputs) -> embeddings``; ``None``: paths run between the inputs
            themselves, which must then be floating point.
        forward_fn: Name of the LightningModule's method that maps a batch of points of that space to outputs
            (e.g. the network after its embedding), or from Python a callable ``(module, points) -> outputs``;
            ``None``: the module itself.
        on_error: What a measurement that fails does: ``warn`` (report it once per distinct error, skip the step and
            go on training) or ``raise`` (end the run with the error, on every process).
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
        compile: Measure with forward passes compiled by ``torch.compile`` (``compile=True`` of
            :func:`~lightning_spacefold.path_folding`): compiled at the first measurement, reused by the later ones
            (the same shapes all fit long). The same values; models with functional activations, or whose
            compilation fails, are measured eagerly with one warning. Not with ``exact``.
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
        figures_every_n_measurements: int = 5,
        num_example_paths: int = 4,
        seed: int = 0,
        embedding_fn: str | ModuleFunction | None = None,
        forward_fn: str | ModuleFunction | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        regularize: bool = False,
        reg_weight: float = 0.01,
        reg_schedule: Literal["constant", "linear", "cosine"] = "constant",
        reg_until: float = 1.0,
        reg_every_n_steps: int = 1,
        reg_num_pairs: int = 16,
        reg_steps: int = 16,
        reg_temperature: float = 0.1,
        reg_pairs: Literal["batch", "probe"] = "batch",
        compile: bool = False,
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
            ("figures_every_n_measurements", figures_every_n_measurements, 1),
            ("num_example_paths", num_example_paths, 1),
            ("reg_every_n_steps", reg_every_n_steps, 1),
            ("reg_num_pairs", reg_num_pairs, 1),
            ("reg_steps", reg_steps, 1),
        ):
            if not is_int(value, minimum):
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        if batch_size is not None and not is_int(batch_size, 1):
            raise ValueError(f"`batch_size` must be None or an integer >= 1, got {batch_size!r}.")
        if pairing not in PAIRINGS:
            raise ValueError(f"`pairing` must be one of {PAIRINGS}, got {pairing!r}.")
        if probe_source not in PROBE_SOURCES:
            raise ValueError(f"`probe_source` must be one of {PROBE_SOURCES}, got {probe_source!r}.")
        if probe_dataset is not None and not isinstance(probe_dataset, Dataset):
            raise TypeError(f"`probe_dataset` must be a torch Dataset, got {type(probe_dataset).__name__}.")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(name, str) for name in layers)):
            raise TypeError(f"`layers` must be None or a list of layer names, got {layers!r}.")
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if not (isinstance(key, str) or is_int(key, 0) or (key is None and name == "label_key")):
                raise TypeError(f"`{name}` must be a batch index (int >= 0) or a dict key (str), got {key!r}.")
        if not is_int(seed, 0):
            raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}.")
        for name, method in (("embedding_fn", embedding_fn), ("forward_fn", forward_fn)):
            if method is not None and not (isinstance(method, str) and method.isidentifier()) and not callable(method):
                raise TypeError(
                    f"`{name}` must be None, the name of a LightningModule method or a callable (module, tensor) -> "
                    f"tensor, got {method!r}."
                )
        if on_error not in _ON_ERROR:
            raise ValueError(f"`on_error` must be one of {_ON_ERROR}, got {on_error!r}.")
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
        if not isinstance(compile, bool):
            raise TypeError(f"`compile` must be a bool, got {compile!r}.")
        if compile and exact:
            raise ValueError("`compile=True` fuses sampled forward passes; it cannot be combined with `exact=True`.")

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
        self.figures_every_n_measurements = figures_every_n_measurements
        self.num_example_paths = num_example_paths
        self.seed = seed
        self.embedding_fn = embedding_fn
        self.forward_fn = forward_fn
        self.on_error = on_error
        self.regularize = regularize
        self.reg_weight = reg_weight
        self.reg_schedule = reg_schedule
        self.reg_until = reg_until
        self.reg_every_n_steps = reg_every_n_steps
        self.reg_num_pairs = reg_num_pairs
        self.reg_steps = reg_steps
        self.reg_temperature = reg_temperature
        self.reg_pairs = reg_pairs
        self.compile = compile

        self.latest_metrics: dict[str, float] = {}
        self.latest_step: int | None = None
        self.latest_result: FoldingResult | None = None
        # The fit's pairs, or with `embedding_fn` its probe set (paired anew in the embedding space); in checkpoints.
        self._drawn: PairBatch | ProbeSet | None = None
        self._metric: SpaceFolding | None = None
        self._batch_size = 0  # points per forward pass, set when a fit or an evaluation starts
        self._checkpoint_step: int | None = None
        self._fit_measurements = 0  # measurements of this fit so far: when the figures are due
        self._failures = FailureReporter()
        self._loss_term: TrainingLossTerm | None = None
        self._figures = FigureProcess()  # draws the figures beside training
        # Lightning reads the key at every hook call: built once, from the configuration validated above.
        self._state_key = self._generate_state_key(
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
            embedding_fn=_describe(self.embedding_fn),
            regularize=self.regularize,
            reg_pairs=self.reg_pairs,
            reg_num_pairs=self.reg_num_pairs,
        )

    @property
    def state_key(self) -> str:
        """Key of the callback's state in a checkpoint: distinct for every measuring configuration."""
        return self._state_key

    # --- when to measure ------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget the pairs of a previous fit and the step of a previous checkpoint (a restored one brings its own)."""
        if stage == "fit":
            self._drawn, self.latest_step, self._fit_measurements = None, None, 0
        self._checkpoint_step = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember the checkpoint's step: an evaluation of the checkpoint is logged at it."""
        self._checkpoint_step = checkpoint.get("global_step")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the probe set and pairs, check the model's layers, and take the first measurement."""
        if self._drawn is None:
            self._drawn = self._draw(trainer, pl_module, "train" if self.probe_source == "train" else "val")
        self._start(trainer, pl_module, self._pairs_of(trainer, pl_module, self._drawn))
        if not trainer.loggers:
            rank_zero_warn(
                "SpaceFoldingCallback: the trainer has no logger; measurements are only kept on the callback "
                "(`latest_metrics`). Pass a logger, e.g. `Trainer(logger=TensorBoardLogger(...))`, to record curves."
            )
        if self.regularize:
            self._regularization_weight(trainer)  # an unknown run length fails now if the schedule needs it
            self._loss_term = TrainingLossTerm(
                pl_module, lambda batch: self._regularization_term(trainer, pl_module, batch)
            )
        if self.measure_at_start and self.latest_step is None:
            self._measure_fit(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure when ``every_n_train_steps`` optimizer steps have passed since the last measurement."""
        step = trainer.global_step
        # Step 0 belongs to the start measurement; with gradient accumulation it lasts several batches.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self.latest_step:
            self._measure_fit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure every ``every_n_epochs`` epochs, unless this step was just measured."""
        epoch_due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if epoch_due and trainer.global_step != self.latest_step:
            self._measure_fit(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure once at the end of ``trainer.validate`` (the validation inside a fit follows the schedule)."""
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._measure_evaluation(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure once at the end of ``trainer.test``."""
        if trainer.state.fn == TrainerFn.TESTING:
            self._measure_evaluation(trainer, pl_module, "test")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own ``training_step`` back; let the figure process finish on its own."""
        self._remove_loss_term()
        self._figures.close()

    def wait_for_figures(self) -> None:
        """Return when every figure of the measurements so far is written.

        The figures are drawn by a child process while training goes on (see ``log_figures``) and can land a moment
        after ``fit`` returns; call this before reading or copying the event files.
        """
        self._figures.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the module its own ``training_step`` back, also when the fit fails."""
        self._remove_loss_term()

    def state_dict(self) -> dict[str, Any]:
        """The pairs or probe set (so that a resumed fit measures the same paths) and the last measurement's step."""
        pairs = self._drawn if isinstance(self._drawn, PairBatch) else None
        probe = self._drawn if isinstance(self._drawn, ProbeSet) else None
        return {
            "starts": None if pairs is None else pairs.starts,
            "ends": None if pairs is None else pairs.ends,
            "start_labels": None if pairs is None else pairs.start_labels,
            "end_labels": None if pairs is None else pairs.end_labels,
            "probe_inputs": None if probe is None else probe.inputs,
            "probe_labels": None if probe is None else probe.labels,
            "latest_step": self.latest_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pairs or probe set and the step of the last measurement."""
        if state_dict["starts"] is not None:
            self._drawn = PairBatch(
                state_dict["starts"], state_dict["ends"], state_dict["start_labels"], state_dict["end_labels"]
            )
        elif state_dict.get("probe_inputs") is not None:
            self._drawn = ProbeSet(state_dict["probe_inputs"], state_dict["probe_labels"])
        self.latest_step = state_dict["latest_step"]

    def _measure_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._drawn is not None
        total, step = trainer.estimated_stepping_batches, trainer.global_step
        # The fit's last measurement: at its last step, or the last one that the step schedule reaches.
        last = step >= total or bool(self.every_n_train_steps and step + self.every_n_train_steps > total)
        figures = self._fit_measurements % self.figures_every_n_measurements == 0 or last
        self._fit_measurements += 1
        self._measure(trainer, pl_module, self._drawn, trainer.global_step, figures)

    def _measure_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: Literal["val", "test"]
    ) -> None:
        # Lightning evaluates under inference mode, in which forward-mode AD (exact=True) cannot run.
        with torch.inference_mode(False):
            drawn = self._draw(trainer, pl_module, source)
            self._start(trainer, pl_module, self._pairs_of(trainer, pl_module, drawn))
            step = trainer.global_step if self._checkpoint_step is None else self._checkpoint_step
            self._measure(trainer, pl_module, drawn, step, figures=True)

    # --- the pairs and the checks before measuring -------------------------------------------------------------

    def _draw(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: Literal["train", "val", "test"]
    ) -> PairBatch | ProbeSet:
        """The probe set's pairs (with ``embedding_fn``: the probe set), the same on every process."""
        for name in ("embedding_fn", "forward_fn"):
            self._method(pl_module, name)  # a wrong name fails before anything runs
        with _preserved_rng(pl_module.device):
            batch = draw_probe(
                probe_loader(trainer, source) if self.probe_dataset is None else self.probe_dataset,
                self.probe_size,
                self.seed,
            )
            inputs, labels = split_batch(batch, self.input_key, self.label_key, embedded=self.embedding_fn is not None)
            drawn = ProbeSet(inputs, labels) if self.embedding_fn is not None else self._pair(inputs, labels)
        # Every process measures the same pairs, also when an iterable dataset is sharded by process.
        return trainer.strategy.broadcast(drawn, src=0)

    def _pair(self, inputs: Tensor, labels: Tensor | None) -> PairBatch:
        return pair_probe(
            inputs,
            labels,
            pairing=self.pairing,
            num_pairs=self.num_pairs,
            include_same_class=self.include_same_class,
            centroids_per_class=self.centroids_per_class,
            seed=self.seed,
        )

    def _pairs_of(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, drawn: PairBatch | ProbeSet, measuring: bool = True
    ) -> PairBatch:
        """The pairs in the space the paths run in: as drawn, or the probe set embedded by the model and paired.

        The embedding runs in eval mode without gradients when ``measuring``, else as the training step runs.
        """
        if isinstance(drawn, PairBatch):
            return drawn
        with _preserved_rng(pl_module.device), evaluation_mode(pl_module) if measuring else nullcontext():
            embedded = self._embed(trainer, pl_module, drawn.inputs)
            labels = None if drawn.labels is None else drawn.labels.to(embedded.device)
            return self._pair(embedded, labels)

    def _embed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        embed = self._method(pl_module, "embedding_fn")
        assert embed is not None
        with trainer.precision_plugin.forward_context():
            embedded = embed(self._inputs(trainer, pl_module, inputs))
        if not (
            isinstance(embedded, Tensor) and embedded.is_floating_point() and embedded.shape[:1] == inputs.shape[:1]
        ):
            raise TypeError(
                f"`embedding_fn={self.embedding_fn!r}` must return a floating-point tensor with one row per input "
                f"([B, ...] for {len(inputs)} inputs), got {getattr(embedded, 'shape', type(embedded).__name__)}."
            )
        return embedded

    def _method(self, pl_module: pl.LightningModule, argument: Literal["embedding_fn", "forward_fn"]) -> Forward | None:
        """The method named by ``embedding_fn`` or ``forward_fn``, a callable bound to the module, or ``None``."""
        name = getattr(self, argument)
        if name is None:
            return None
        if callable(name):
            # Bound like a method: the same function and module give an equal callable at every measurement.
            return MethodType(name, pl_module)
        method = getattr(pl_module, name, None)
        if not callable(method):
            raise ValueError(
                f"`{argument}={name!r}` is not a method of {type(pl_module).__name__}; name one of its methods "
                f"({'inputs to embeddings' if argument == 'embedding_fn' else 'embeddings to outputs'})."
            )
        return method

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pairs: PairBatch) -> None:
        """Check the configuration against the model (errors raise here, never mid-run) and set up the metric."""
        if self.exact and isinstance(trainer.strategy, _SHARDED):
            raise ValueError(
                f"exact=True runs a data-dependent number of forward passes, which {type(trainer.strategy).__name__} "
                "cannot run on one process alone (it gathers parameters from all of them). Use a step count."
            )
        first = pairs.select(slice(0, 1))
        starts = self._inputs(trainer, pl_module, first.starts)
        found = discover_layers(
            pl_module, starts, self._inputs(trainer, pl_module, first.ends), self._method(pl_module, "forward_fn")
        )
        names = [found[index].name for index in select_layers([layer.name for layer in found], self.layers)]
        start_labels, end_labels = pairs.start_labels, pairs.end_labels
        num_classes = None
        if start_labels is not None and end_labels is not None:
            num_classes = int(torch.cat([start_labels, end_labels]).max()) + 1
        self._metric = SpaceFolding(num_classes=num_classes).to(pl_module.device)
        self._batch_size = self.batch_size or default_batch_size(found, starts, self.compile, pl_module)
        if trainer.is_global_zero:
            add_custom_scalars(trainer.loggers, names)

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
            assert self._drawn is not None
            few = self._pairs_of(trainer, pl_module, self._drawn, measuring=False).select(slice(0, self.reg_num_pairs))
            starts, ends = self._inputs(trainer, pl_module, few.starts), self._inputs(trainer, pl_module, few.ends)
        else:
            embedded = self.embedding_fn is not None
            inputs = split_batch(batch, self.input_key, self.label_key, embedded=embedded)[0]
            if embedded:
                inputs = self._embed(trainer, pl_module, inputs)
            if len(inputs) < 2:
                # A batch of one sample has no pair. Zero-length paths add exactly 0 and keep the forward passes the
                # same on every process.
                starts = ends = inputs[torch.zeros(self.reg_num_pairs, dtype=torch.long, device=inputs.device)]
            else:
                # Seeded by step and process: reproducible, and a resumed fit draws what an uninterrupted one would.
                generator = torch.Generator().manual_seed(hash((self.seed, trainer.global_rank, step)) % 2**62)
                pairs = random_pairs(inputs, self.reg_num_pairs, generator=generator)
                starts, ends = pairs.starts, pairs.ends
        term = folding_penalty(
            pl_module,
            starts,
            ends,
            weight,
            steps=self.reg_steps,
            temperature=self.reg_temperature,
            layers=self.layers,
            forward=self._method(pl_module, "forward_fn"),
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

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        drawn: PairBatch | ProbeSet,
        step: int,
        figures: bool,
    ) -> None:
        """Measure the pairs and log the values; a failure is reported and skipped, or raised (``on_error``)."""
        draw_figures = figures and self.log_figures and has_tensorboard(trainer.loggers)
        error: Exception | None = None
        result, example_patterns = None, None
        batch_size = self._batch_size
        try:
            pairs = self._pairs_of(trainer, pl_module, drawn)
            share, count = _padded_share(len(pairs), trainer.world_size, trainer.global_rank)
            result, example_patterns = self._measure_share(trainer, pl_module, pairs.select(share), count, draw_figures)
        except Exception as caught:  # a monitoring callback must not end the run: reported below
            error = caught
            if is_out_of_memory(caught) and isinstance(trainer.strategy, _SHARDED):
                # Sharded processes cannot retry alone (the others' forward passes wait for theirs): all of them
                # measure with fewer points from the next measurement on.
                self._batch_size = halved(self._batch_size, self._smallest_batch_size())
        failed_ranks, self._batch_size = agree_on_failures(trainer, error is not None, self._batch_size)
        if self._batch_size < batch_size:
            rank_zero_warn(
                f"SpaceFoldingCallback: out of memory with {batch_size} points per forward pass; measuring with "
                f"{self._batch_size} from now on (set `batch_size` to choose)."
            )
        what = f"the measurement at step {step}"
        if bool(failed_ranks.any()):
            self._fail(trainer, failed_ranks, error, what)
            return
        try:
            scalars = self._log(trainer, step, example_patterns)
        except Exception as caught:  # after the last collective: this process alone reports it
            self._fail(trainer, torch.arange(trainer.world_size) == trainer.global_rank, caught, what)
            return
        self.latest_metrics, self.latest_step, self.latest_result = scalars, step, result

    def _measure_share(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, share: PairBatch, count: int, draw_figures: bool
    ) -> tuple[FoldingResult, Tensor | None]:
        """Measure this process's share (the first ``count`` paths are its own, the rest padding) into the metric."""
        assert self._metric is not None
        self._metric.reset()
        starts, ends = self._inputs(trainer, pl_module, share.starts), self._inputs(trainer, pl_module, share.ends)
        forward = self._method(pl_module, "forward_fn")

        def measure(batch_size: int) -> FoldingResult:
            return path_folding(
                pl_module,
                starts,
                ends,
                steps=self.steps,
                layers=self.layers,
                batch_size=batch_size,
                exact=self.exact,
                forward=forward,
                compile=self.compile,
            )

        # The trainer's precision measures the network as it trains; the RNG is preserved whatever the model's
        # forward does in eval mode.
        with _preserved_rng(pl_module.device), trainer.precision_plugin.forward_context():
            smallest = self._batch_size if isinstance(trainer.strategy, _SHARDED) else self._smallest_batch_size()
            result, batch_size = with_memory_backoff(measure, self._batch_size, smallest)
            example_patterns = None
            if draw_figures:
                # The most folded paths (most paths do not fold at all), as many on every process as on process 0.
                few = result.chi.argsort(descending=True, stable=True)[: self.num_example_paths]
                example_patterns = path_patterns(
                    pl_module,
                    starts[few],
                    ends[few],
                    steps=self.steps,
                    layers=self.layers,
                    forward=forward,
                    compile=self.compile,
                )
        self._batch_size = batch_size
        result = result.select(slice(0, count))
        if count:
            labels = (share.start_labels, share.end_labels)
            device = pl_module.device
            self._metric.update_from_result(
                result, *(None if label is None else label[:count].to(device) for label in labels)
            )
        return result, example_patterns

    def _smallest_batch_size(self) -> int:
        """The fewest points per forward pass that the out-of-memory back-off tries: one path's."""
        return min(self._batch_size, self.steps + 1)

    def _log(self, trainer: pl.Trainer, step: int, example_patterns: Tensor | None) -> dict[str, float]:
        """Compute the values over all processes and hand them to the loggers; return the scalars."""
        assert self._metric is not None
        values = self._metric.compute()
        all_chi = None
        if self.log_histogram and has_tensorboard(trainer.loggers):
            with self._metric.sync_context():
                all_chi = dim_zero_cat(self._metric.chi).clone()
        scalars = {f"{PREFIX}/{name}": value.item() for name, value in values.items() if value.ndim == 0}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if trainer.is_global_zero:
            if all_chi is not None:
                log_histogram(trainer.loggers, step, all_chi)
            if example_patterns is not None:
                views = figure_views(values, example_patterns)
                self._figures.submit(tensorboard_dirs(trainer.loggers), step, PREFIX, views)
        return scalars

    def _fail(self, trainer: pl.Trainer, failed_ranks: Tensor, error: Exception | None, what: str) -> None:
        """A failed measurement: raised with ``on_error="raise"`` (on every process), else reported and skipped."""
        if self.on_error == "raise":
            if error is not None:
                raise error
            raise RuntimeError(
                f"SpaceFoldingCallback: {what} failed on process {int(failed_ranks.nonzero()[0])} "
                "(on_error='raise'); its error ends the run there."
            )
        self._failures.warn(trainer, failed_ranks, error, what)


def _describe(function: str | ModuleFunction | None) -> str | None:
    """A name that stays the same from run to run: a method's name, or a callable's qualified name."""
    if function is None or isinstance(function, str):
        return function
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__name__)}"


def _padded_share(num_pairs: int, world_size: int, rank: int) -> tuple[Tensor, int]:
    """This process's pair indices, padded with repeats to as many as process 0 has, and how many are its own."""
    own = torch.arange(num_pairs).tensor_split(world_size)[rank]
    size = math.ceil(num_pairs / world_size)
    padding = (own[:1] if len(own) else torch.zeros(1, dtype=torch.long)).expand(size - len(own))
    return torch.cat([own, padding]), len(own)


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
