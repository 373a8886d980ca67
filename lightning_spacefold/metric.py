"""Space folding as a :class:`torchmetrics.Metric`: :class:`SpaceFolding`.

The metric aggregates the folding of many paths into the network-level values of the specification (section 4):
the mean, the median of the non-zero values (the papers' Phi_N) and the share of folded paths, per layer and, with
class labels, per ordered pair of classes. Every state is synchronised by torchmetrics, so the values over several
processes equal those of one process that saw all paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.imports import _MATPLOTLIB_AVAILABLE
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from lightning_spacefold.checks import is_int
from lightning_spacefold.folding import path_folding
from lightning_spacefold.result import FoldingResult

__all__ = ["SpaceFolding"]

if not _MATPLOTLIB_AVAILABLE:
    __doctest_skip__ = ["SpaceFolding.plot"]

_PlotValue = Tensor | dict[str, Tensor] | Sequence[Tensor] | Sequence[dict[str, Tensor]]


class SpaceFolding(Metric):
    r"""Space folding of a network along straight paths between pairs of inputs.

    Each path from ``x1`` to ``x2`` gets the folding value :math:`\chi = 1 - r_1 / r_2` in ``[0, 1)`` of
    :func:`~lightning_spacefold.path_folding`: 0 when the walk of activation patterns along the segment never turns
    back, larger the more it returns towards where it started. The metric aggregates all paths it is given.

    As input to ``forward`` and ``update`` the metric accepts the following input:

    - ``model`` (:class:`~torch.nn.Module`): the network to measure
    - ``starts`` (:class:`~torch.Tensor`): start of each path, ``[P, *input_shape]``, floating point
    - ``ends`` (:class:`~torch.Tensor`): end of each path, same shape as ``starts``
    - ``start_labels``, ``end_labels`` (:class:`~torch.Tensor`, optional): integer classes in ``[0, num_classes)``
      of the start and end of each path, ``[P]``; required exactly when ``num_classes`` is set

    Paths measured beforehand enter through :meth:`update_from_result` instead.

    As output of ``forward`` and ``compute`` the metric returns a ``dict`` of tensors:

    - ``folding``: mean :math:`\chi` over all paths
    - ``folding_median_nonzero``: median of the non-zero :math:`\chi` (the papers' :math:`\Phi_N`); for an even count
      the mean of the two middle values (as :func:`numpy.median` and :func:`statistics.median`), and 0 when no path
      folds
    - ``folded_fraction``: share of the paths with :math:`\chi > 0`
    - ``folding_max``: mean of each path's maximal folding over its prefixes, :math:`\chi_{max} = \max_j \chi_j`
      (:attr:`~lightning_spacefold.FoldingResult.chi_max`)
    - ``folding_max_median_nonzero``: median of the non-zero :math:`\chi_{max}`, the papers' "median of maxima of
      non-zero space folding" (:math:`\chi_{max} > 0` exactly where :math:`\chi > 0`)
    - ``layer/<name>``: mean over all paths of :math:`\chi` computed on that layer's bits alone, for every measured
      layer
    - ``layer_max/<name>``: mean over all paths of :math:`\chi_{max}` on that layer's bits alone
    - ``class_pair_folding`` (only with ``num_classes``): ``[num_classes, num_classes]`` matrix, entry ``(a, b)`` the
      mean :math:`\chi` of the paths from class ``a`` to class ``b``, NaN where there is none
    - ``class_pair_count`` (only with ``num_classes``): ``[num_classes, num_classes]`` number of paths (int64)

    The two class-pair matrices are not scalars: leave them out of a dict given to ``LightningModule.log_dict``.
    In a :class:`~torchmetrics.wrappers.MetricTracker`, ``best_metric`` handles dict outputs only for a collection:
    track ``MetricCollection([SpaceFolding()])`` with ``maximize=True``.
    :meth:`compute` raises a ``RuntimeError`` when no path was measured (in any process), since neither the values
    nor the layer names exist then.

    Distributed: per-path values are gathered across processes ("cat" states) and class-pair sums and counts are
    summed, so the median is exact. The layer names travel with the states too, hence a process that measured no
    path takes part in the synchronisation with empty states and still returns every key; not every process needs
    to call ``update``.

    Args:
        steps: Number of segments each path is cut into (see :func:`~lightning_spacefold.path_folding`).
        exact: Follow the exact sequence of linear regions along each path instead of ``steps`` samples
            (piecewise-linear networks only).
        layers: Names of the activation layers to measure; ``None`` for all.
        batch_size: Points per forward pass; ``None`` chooses it from the model's largest activation.
        num_classes: Number of classes of the labels; when given, every update needs ``start_labels`` and
            ``end_labels`` and the output holds the class-pair matrices (their shape must be fixed in advance so
            that processes can sum them).
        kwargs: Additional keyword arguments of :class:`~torchmetrics.Metric`.

    Raises:
        ValueError: If ``steps``, ``batch_size`` or ``num_classes`` is not a positive integer (``None`` allowed for
            the last two), or ``layers`` is empty.
        TypeError: If ``exact`` is not a bool or ``layers`` is not a sequence of strings.

    Examples:
        Two paths through the network of :func:`~lightning_spacefold.path_folding`'s example: one folds
        (``chi = 1/3``, ``1/2`` on the last layer's bit), the other stays inside one region (``chi = 0``).

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import SpaceFolding
        >>> model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
        >>> # a = relu(x), b = relu(x - 1), then c = relu(a - 2 b - 0.5): on when 0.5 < x < 1.5
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
        >>> starts, ends = torch.tensor([[0.25], [0.25]]), torch.tensor([[1.75], [0.4]])
        >>> metric = SpaceFolding(steps=3)
        >>> metric.update(model, starts, ends)
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'folding': 0.1667, 'folding_median_nonzero': 0.3333, 'folded_fraction': 0.5, 'folding_max': 0.1667,
         'folding_max_median_nonzero': 0.3333, 'layer/1': 0.0, 'layer/3': 0.25, 'layer_max/1': 0.0, 'layer_max/3': 0.25}

        Folding per ordered pair of classes, here both paths from class 0, the folding one to class 1:

        >>> metric = SpaceFolding(steps=3, num_classes=2)
        >>> metric.update(model, starts, ends, torch.tensor([0, 0]), torch.tensor([1, 0]))
        >>> metric.compute()["class_pair_folding"]
        tensor([[0.0000, 0.3333],
                [   nan,    nan]])

    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    chi: list[Tensor]
    layer_chi: list[Tensor]
    chi_max: list[Tensor]
    layer_chi_max: list[Tensor]
    layer_names_code: list[Tensor]
    class_pair_sum: Tensor
    class_pair_count: Tensor

    def __init__(
        self,
        steps: int = 64,
        exact: bool = False,
        layers: Sequence[str] | None = None,
        batch_size: int | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not is_int(steps, 1):
            raise ValueError(f"Expected argument `steps` to be an integer >= 1 (segments per path), got {steps!r}.")
        if not isinstance(exact, bool):
            raise TypeError(f"Expected argument `exact` to be a bool, got {exact!r}.")
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
                raise TypeError(f"Expected argument `layers` to be None or a sequence of layer names, got {layers!r}.")
            if len(layers) == 0:
                raise ValueError("Expected argument `layers` to name at least one layer, or to be None for all.")
            layers = list(layers)
        if batch_size is not None and not is_int(batch_size, 1):
            raise ValueError(f"Expected argument `batch_size` to be None or an integer >= 1, got {batch_size!r}.")
        if num_classes is not None and not is_int(num_classes, 1):
            raise ValueError(f"Expected argument `num_classes` to be None or an integer >= 1, got {num_classes!r}.")
        self.steps = steps
        self.exact = exact
        self.layers = layers
        self.batch_size = batch_size
        self.num_classes = num_classes

        self.add_state("chi", default=[], dist_reduce_fx="cat")
        # Flattened [P, L] rows: a process without updates contributes torchmetrics' 1-D empty placeholder, and
        # all-gathering needs the same number of dimensions everywhere.
        self.add_state("layer_chi", default=[], dist_reduce_fx="cat")
        self.add_state("chi_max", default=[], dist_reduce_fx="cat")
        self.add_state("layer_chi_max", default=[], dist_reduce_fx="cat")
        # The layer names, JSON-encoded as ASCII codes, one copy per process (or forward call) that saw paths: the
        # names then reach processes without updates through the ordinary sync. Stored in the metric's float
        # dtype because that is the dtype of the placeholder the other processes send.
        self.add_state("layer_names_code", default=[], dist_reduce_fx="cat")
        if num_classes is not None:
            self.add_state("class_pair_sum", default=torch.zeros(num_classes, num_classes), dist_reduce_fx="sum")
            self.add_state(
                "class_pair_count",
                default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                dist_reduce_fx="sum",
            )

    def update(
        self,
        model: nn.Module,
        starts: Tensor,
        ends: Tensor,
        start_labels: Tensor | None = None,
        end_labels: Tensor | None = None,
        forward: Callable[[Tensor], Any] | None = None,
    ) -> None:
        """Measure the folding of the paths from ``starts[p]`` to ``ends[p]`` and accumulate it.

        Args:
            model: The network; it must take a batch ``[B, *input_shape]`` (or ``forward`` does).
            starts: Start of each path, ``[P, *input_shape]``, floating point.
            ends: End of each path, same shape, dtype and device as ``starts``.
            start_labels: Class of each start, ``[P]`` integers in ``[0, num_classes)``; with ``num_classes`` only.
            end_labels: Class of each end, ``[P]``; given exactly when ``start_labels`` is.
            forward: The function that maps a batch of points to outputs (see
                :func:`~lightning_spacefold.path_folding`); ``model`` by default.

        Raises:
            TypeError: For arguments of the wrong type (see also :func:`~lightning_spacefold.path_folding`).
            ValueError: For labels that do not match ``num_classes`` or the paths, invalid inputs (see
                :func:`~lightning_spacefold.path_folding`), or layers other than those of earlier updates.
        """
        # Labels are checked before the costly measurement; path_folding checks the model and the inputs.
        num_paths = starts.shape[0] if isinstance(starts, Tensor) and starts.ndim > 0 else None
        labels = self._check_labels(start_labels, end_labels, num_paths)
        result = path_folding(
            model,
            starts,
            ends,
            steps=self.steps,
            layers=self.layers,
            batch_size=self.batch_size,
            exact=self.exact,
            forward=forward,
        )
        self._accumulate(result, labels)

    def update_from_result(
        self,
        result: FoldingResult,
        start_labels: Tensor | None = None,
        end_labels: Tensor | None = None,
    ) -> None:
        """Accumulate paths measured beforehand, for example by :func:`~lightning_spacefold.path_folding`.

        The metric's own settings (``steps``, ``layers``, ...) do not apply: the result is taken as it is.

        Args:
            result: Folding of ``P >= 1`` paths.
            start_labels: Class of each path's start, ``[P]`` integers in ``[0, num_classes)``; with ``num_classes``
                only.
            end_labels: Class of each path's end, ``[P]``; given exactly when ``start_labels`` is.

        Raises:
            TypeError: If ``result`` is not a :class:`~lightning_spacefold.FoldingResult` or labels are not integer
                tensors.
            ValueError: For a result without paths or with inconsistent shapes, labels that do not match
                ``num_classes`` or the paths, or layers other than those of earlier updates.
        """
        if not isinstance(result, FoldingResult):
            raise TypeError(f"Expected `result` to be a FoldingResult, got {type(result).__name__}.")
        num_paths, num_layers = len(result.chi), len(result.layer_names)
        if result.chi.ndim != 1 or num_paths == 0:
            raise ValueError(
                f"Expected `result.chi` to hold at least one path, shape [P], got {tuple(result.chi.shape)}."
            )
        for name in ("chi_max",):
            if getattr(result, name).shape != (num_paths,):
                raise ValueError(
                    f"Expected `result.{name}` of shape [P] = [{num_paths}], got {tuple(getattr(result, name).shape)}."
                )
        for name in ("layer_chi", "layer_chi_max"):
            if getattr(result, name).shape != (num_paths, num_layers):
                raise ValueError(
                    f"Expected `result.{name}` of shape [P, L] = [{num_paths}, {num_layers}] (L layer names), got "
                    f"{tuple(getattr(result, name).shape)}."
                )
        labels = self._check_labels(start_labels, end_labels, num_paths)
        # Through torchmetrics' update wrapper, like ``update``: it counts the update and drops a cached compute.
        self._wrap_update(self._accumulate)(result, labels)

    def compute(self) -> dict[str, Tensor]:
        """Compute the folding statistics over all paths (of all processes).

        Returns:
            The statistics described in the class docstring, by name.

        Raises:
            RuntimeError: If no path was measured.
        """
        if len(self.chi) == 0:
            raise RuntimeError(
                "SpaceFolding.compute() needs at least one measured path; call update() or update_from_result() "
                "first (in at least one process)."
            )
        chi, chi_max = dim_zero_cat(self.chi), dim_zero_cat(self.chi_max)
        names = _decode_names(self.layer_names_code) or []
        layer_chi = dim_zero_cat(self.layer_chi).view(len(chi), len(names))
        layer_chi_max = dim_zero_cat(self.layer_chi_max).view(len(chi), len(names))
        folded = chi > 0
        output = {
            "folding": chi.mean(),
            "folding_median_nonzero": _median(chi[folded]),
            "folded_fraction": folded.to(chi.dtype).mean(),
            "folding_max": chi_max.mean(),
            "folding_max_median_nonzero": _median(chi_max[chi_max > 0]),
        }
        output.update({f"layer/{name}": value for name, value in zip(names, layer_chi.mean(0), strict=True)})
        output.update({f"layer_max/{name}": value for name, value in zip(names, layer_chi_max.mean(0), strict=True)})
        if self.num_classes is not None:
            # 0 / 0 gives the documented NaN for class pairs without paths.
            output["class_pair_folding"] = self.class_pair_sum / self.class_pair_count
            output["class_pair_count"] = self.class_pair_count
        return output

    def plot(self, val: _PlotValue | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot a single or multiple values from the metric.

        The scalar entries are plotted (the summary values and the per-layer means); the class-pair matrices are
        left out.

        Args:
            val: Either a single result from calling ``metric.forward`` or ``metric.compute`` or a list of these
                results. If no value is provided, will automatically call ``metric.compute`` and plot that result.
            ax: An matplotlib axis object. If provided will add plot to that axis.

        Returns:
            Figure and Axes object

        Raises:
            ModuleNotFoundError:
                If ``matplotlib`` is not installed

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from lightning_spacefold import SpaceFolding
            >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> metric = SpaceFolding(steps=16)
            >>> values = [metric(model, torch.randn(10, 2), torch.randn(10, 2)) for _ in range(5)]
            >>> fig_, ax_ = metric.plot(values)
        """
        val = self.compute() if val is None else val
        if isinstance(val, dict):
            val = _scalar_entries(val)
        elif isinstance(val, Sequence) and val and isinstance(val[0], dict):
            # A sequence whose first entry is a dict holds dicts only (_PlotValue).
            val = [_scalar_entries(value) for value in cast(Sequence[dict[str, Tensor]], val)]
        return self._plot(val, ax)

    def _check_labels(
        self, start_labels: Tensor | None, end_labels: Tensor | None, num_paths: int | None
    ) -> tuple[Tensor, Tensor] | None:
        """Validated labels on the metric's device, or ``None``; ``num_paths`` is ``None`` when not yet known."""
        if (start_labels is None) != (end_labels is None):
            raise ValueError("Pass both `start_labels` and `end_labels`, or neither.")
        if start_labels is None or end_labels is None:
            if self.num_classes is not None:
                raise ValueError(
                    f"This SpaceFolding has num_classes={self.num_classes}, so every update needs `start_labels` and "
                    "`end_labels` (the class-pair matrix covers all paths); create it without num_classes for "
                    "unlabelled paths."
                )
            return None
        if self.num_classes is None:
            raise ValueError(
                "Labels were given but the metric has no `num_classes`; create it with SpaceFolding(num_classes=C): "
                "C fixes the shape of the class-pair matrix, which all processes must share."
            )
        for name, labels in (("start_labels", start_labels), ("end_labels", end_labels)):
            if not isinstance(labels, Tensor):
                raise TypeError(f"Expected `{name}` to be a torch.Tensor of shape [P], got {type(labels).__name__}.")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"Expected `{name}` to have an integer dtype, got {labels.dtype}.")
            if labels.ndim != 1 or (num_paths is not None and len(labels) != num_paths):
                expected = "P" if num_paths is None else num_paths
                raise ValueError(f"Expected `{name}` of shape [{expected}] (one per path), got {tuple(labels.shape)}.")
            outside = labels[(labels < 0) | (labels >= self.num_classes)]
            if len(outside) > 0:
                raise ValueError(
                    f"Expected `{name}` in [0, num_classes) = [0, {self.num_classes}), got {outside[0].item()}."
                )
        return start_labels.to(self.device, torch.long), end_labels.to(self.device, torch.long)

    def _accumulate(self, result: FoldingResult, labels: tuple[Tensor, Tensor] | None) -> None:
        """Append a checked result to the states; the one code path of both updates."""
        known = _decode_names(self.layer_names_code)
        if known is None:
            self.layer_names_code.append(_encode_names(result.layer_names, self.device, self.dtype))
        elif known != result.layer_names:
            raise ValueError(
                f"Every update must measure the same layers: earlier updates measured {known}, this one "
                f"{result.layer_names}. Pass `layers=` to choose them, or call reset() before measuring other layers."
            )
        chi = result.chi.to(self.device, self.dtype)
        self.chi.append(chi)
        self.layer_chi.append(result.layer_chi.to(self.device, self.dtype).flatten())
        self.chi_max.append(result.chi_max.to(self.device, self.dtype))
        self.layer_chi_max.append(result.layer_chi_max.to(self.device, self.dtype).flatten())
        if labels is not None:
            self.class_pair_sum.index_put_(labels, chi, accumulate=True)
            self.class_pair_count.index_put_(labels, torch.ones_like(labels[0]), accumulate=True)


def _encode_names(names: list[str], device: torch.device, dtype: torch.dtype) -> Tensor:
    """One copy of the layer names: ASCII codes of their JSON list, ended by a newline (JSON never holds one)."""
    text = json.dumps(names) + "\n"
    return torch.tensor(list(text.encode("ascii")), device=device, dtype=dtype)


def _decode_names(code: list[Tensor] | Tensor) -> list[str] | None:
    """The layer names held by the copies in ``code``; ``None`` when there is none.

    Raises:
        ValueError: If the copies differ (processes, or merged states, measured different layers).
    """
    if len(code) == 0:
        return None
    text = bytes(dim_zero_cat(code).long().tolist()).decode("ascii")
    copies = sorted(set(text.splitlines()))
    if len(copies) > 1:
        raise ValueError(
            "SpaceFolding received paths measured on different layers (from different processes or merged "
            f"states): {' and '.join(copies)}. Measure the same layers everywhere, e.g. with `layers=`."
        )
    return json.loads(copies[0])


def _median(values: Tensor) -> Tensor:
    """Median, for an even count the mean of the two middle values (as numpy); 0 for no values."""
    if len(values) == 0:
        return values.new_zeros(())
    ordered = values.sort().values
    count = len(ordered)
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def _scalar_entries(value: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a computed value that hold a single number (the plot has no place for the matrices)."""
    return {name: entry for name, entry in value.items() if entry.numel() == 1}
