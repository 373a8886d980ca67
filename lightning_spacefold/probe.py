"""The probe set: the inputs whose pairs the callback measures, drawn once from the data and paired.

Reads inputs and labels out of batches of the usual forms (a tensor, a tuple or list, a dict), draws a fixed
number of items with a seed (the same items on every process and for any number of processes), finds the
dataloader of a trainer to draw from, and pairs the items with one of the strategies of
:mod:`lightning_spacefold.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_spacefold.sampling import PairBatch, centroid_pairs, class_pairs, random_pairs

__all__ = [
    "PAIRINGS",
    "PROBE_SOURCES",
    "ProbeSet",
    "draw_probe",
    "first_tensor",
    "pair_probe",
    "probe_loader",
    "split_batch",
]

PAIRINGS = ("auto", "random", "class", "centroid")
PROBE_SOURCES = ("val", "train")
Pairing = Literal["auto", "random", "class", "centroid"]


class ProbeSet(NamedTuple):
    """Probe inputs as drawn (e.g. token ids), kept when paths run between their embeddings."""

    inputs: Tensor
    labels: Tensor | None


def split_batch(
    batch: Any, input_key: int | str, label_key: int | str | None, embedded: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The inputs and the class labels (or ``None``) of a batch.

    Args:
        batch: A tensor (inputs only), a tuple/list (read by position) or a dict (read by key).
        input_key: Where the inputs are: an index or a key.
        label_key: Where the labels are, or ``None``. Labels that are not a 1-D integer tensor are dropped with
            a warning.
        embedded: Whether the inputs are embedded before paths run between them (they may then be integer ids).

    Returns:
        ``(inputs, labels)``; ``labels`` is ``None`` when the batch has none at ``label_key``.

    Raises:
        TypeError: If the batch has another type, or the inputs are not a tensor (a floating-point one unless
            ``embedded``).
        ValueError: If ``input_key`` is not in the batch.
    """
    if isinstance(batch, Tensor):
        inputs, labels = batch, None
    elif isinstance(batch, Mapping):
        if input_key not in batch:
            raise ValueError(
                f"The probe batches are dicts with keys {sorted(batch)}; set `input_key` (and `label_key`) to "
                f"the keys of the inputs and labels (input_key={input_key!r} is not one of them)."
            )
        inputs = batch[input_key]
        labels = batch.get(label_key) if label_key is not None else None
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        if not isinstance(input_key, int) or input_key >= len(batch):
            raise ValueError(
                f"The probe batches are sequences of {len(batch)} items; set `input_key` (and `label_key`) to "
                f"the positions of the inputs and labels, got input_key={input_key!r}."
            )
        inputs = batch[input_key]
        labels = batch[label_key] if isinstance(label_key, int) and label_key < len(batch) else None
    else:
        raise TypeError(
            f"SpaceFoldingCallback cannot read probe batches of type {type(batch).__name__}; batches must be a "
            "tensor, a tuple/list or a dict."
        )
    if not isinstance(inputs, Tensor) or not (embedded or inputs.is_floating_point()):
        found = getattr(inputs, "dtype", type(inputs).__name__)
        raise TypeError(
            f"The probe inputs at input_key={input_key!r} must be a floating-point tensor (paths run between "
            f"them), got {found}. Set `input_key` to where the inputs are, or, for token ids, `embedding_fn` (and "
            "`forward_fn`) to the model's methods that embed them and run the rest of the network."
        )
    if labels is not None and (not isinstance(labels, Tensor) or labels.is_floating_point() or labels.ndim != 1):
        rank_zero_warn(
            f"SpaceFoldingCallback: the batch item at label_key={label_key!r} is not a 1-D integer tensor "
            "of class labels, so the probe set has no labels. Set `label_key=None` to silence this."
        )
        labels = None
    return inputs, labels


def probe_loader(trainer: pl.Trainer, source: Literal["val", "train", "test"]) -> DataLoader:
    """The trainer's first dataloader of ``source``; for ``val`` without validation data, the training data.

    Raises:
        ValueError: If the trainer has no such dataloader.
    """
    if source == "test":
        loader = first_loader(trainer.test_dataloaders)
    elif source == "val":
        if trainer.val_dataloaders is None and trainer.enable_validation and trainer.training:
            # Lightning sets the validation data up lazily when the first epoch of a fit does not validate.
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            trainer.training = True
        loader = first_loader(trainer.val_dataloaders)
        if loader is None and trainer.training:
            rank_zero_warn(
                "SpaceFoldingCallback: the fit has no validation data, so the probe set is drawn from the training "
                "data. Pass `probe_source='train'` to say so, or `probe_dataset=...` to choose the inputs."
            )
            loader = first_loader(trainer.train_dataloader)
    else:
        loader = first_loader(trainer.train_dataloader)
    if loader is None:
        raise ValueError(
            f"SpaceFoldingCallback found no {source} dataloader to draw the probe set from; pass `probe_dataset`."
        )
    return loader


def first_loader(loaders: Any) -> DataLoader | None:
    """The first DataLoader of whatever Lightning holds (a loader, a list or a dict of them)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence):
        return next((loader for loader in map(first_loader, loaders) if loader is not None), None)
    return None


def draw_probe(source: Dataset | DataLoader, size: int, seed: int) -> Any:
    """``size`` items drawn without replacement with ``seed``, collated into one batch.

    Map-style datasets (also a loader's) are indexed directly, so the draw does not depend on the loader's sampler
    (shuffling, distributed sampling) or on the number of processes. Iterable datasets are read in order from
    their loader.

    Args:
        source: A map-style dataset (items collated with ``default_collate``), or a dataloader (its collate
            function is used).
        size: Number of items; all of them when the dataset is smaller.
        seed: Seed of the draw.

    Returns:
        One batch.

    Raises:
        TypeError: If ``source`` is an iterable dataset without a loader, or a batch holds no tensor.
    """
    loader = source if isinstance(source, DataLoader) else None
    dataset = source.dataset if isinstance(source, DataLoader) else source
    collate: Callable[[list[Any]], Any] = (loader.collate_fn if loader is not None else None) or default_collate
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:size]
        return collate([dataset[index] for index in indices.tolist()])
    if loader is None:
        raise TypeError("`probe_dataset` must be a map-style dataset (with __len__ and __getitem__).")
    batches, count = [], 0
    for batch in loader:
        batches.append(batch)
        first = first_tensor(batch)
        if first is None:
            raise TypeError(f"SpaceFoldingCallback found no tensor in a probe batch of type {type(batch).__name__}.")
        count += len(first)
        if count >= size:
            break
    return _concatenate(batches, size)


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor in a batch of nested tuples, lists and dicts (for its length), or ``None``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
        return None
    return next((tensor for tensor in map(first_tensor, batch) if tensor is not None), None)


def _concatenate(batches: list[Any], size: int) -> Any:
    """The first ``size`` items of collated batches, joined the way they were collated."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)[:size]
    if isinstance(first, Mapping):
        return {key: _concatenate([batch[key] for batch in batches], size) for key in first}
    if isinstance(first, (str, bytes)) or not isinstance(first, Sequence):
        return first
    if all(isinstance(item, (str, bytes, int, float)) for item in first):
        # A collated list of plain values, one per item (e.g. string ids): the items of all batches, in order.
        return [item for batch in batches for item in batch][:size]
    return [_concatenate([batch[index] for batch in batches], size) for index in range(len(first))]


def pair_probe(
    inputs: Tensor,
    labels: Tensor | None,
    *,
    pairing: Pairing,
    num_pairs: int,
    include_same_class: bool,
    centroids_per_class: int,
    seed: int,
) -> PairBatch:
    """Pair the probe set (see :class:`~lightning_spacefold.SpaceFoldingCallback` for the strategies).

    Raises:
        ValueError: If the pairing needs labels and there are none, or as the strategies of
            :mod:`~lightning_spacefold.sampling`.
    """
    generator = torch.Generator().manual_seed(seed)
    if pairing == "auto":
        pairing = "class" if labels is not None else "random"
    if pairing == "random":
        return random_pairs(inputs, num_pairs, labels=labels, generator=generator)
    if labels is None:
        raise ValueError(
            f"pairing={pairing!r} needs class labels, but the probe batches have none. Set `label_key` to where the "
            "labels are, or use pairing='random'."
        )
    if pairing == "class":
        return class_pairs(inputs, labels, num_pairs, include_same_class=include_same_class, generator=generator)
    return centroid_pairs(
        inputs, labels, centroids_per_class, include_same_class=include_same_class, generator=generator
    )
