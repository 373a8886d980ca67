"""path_folding on a zoo of common architectures with random weights: what it finds and what it costs.

Run: python benchmarks/bench_zoo.py [--quick] [--networks resnet18,unet,...] [--repeats 5] [--paths 4] [--threads N]
[--no-exact] [--compile]

Networks (random weights, nothing downloaded): torchvision resnet18, mobilenet_v3_small, efficientnet_b0 and
vgg11_bn; timm vit_tiny_patch16_224 (at img_size=64) and convnext_atto; a Hugging Face ViTModel of a small ViTConfig
(called through ``forward=``); ``nn.TransformerEncoder`` with ReLU and with GELU; a small U-Net written here. CNNs
take 3x32x32 inputs, ViTs 3x64x64 (16 patches), the encoders 32 tokens of 128. Networks whose package (torchvision,
timm, transformers: ``pip install -e ".[zoo]"``) is missing are skipped with a note.

For each network it prints the activation layers found, the units per point (sum of ``num_units``) and:

0. the first affine block's share of the plain forward of the 4 x 33 points: its FLOPs over the forward's
   (``FlopCounterMode``: matrix products, convolutions and attention, not elementwise operations; the first matrix
   product or convolution that runs, also inside ``F.multi_head_attention_forward``), and its time (that call alone
   on the same input over the forward in one batch, best of the repeats each); what the points go through before
   the first affine map a ``TorchFunctionMode`` sees, and whether the line shortcut was taken: the forward passes of
   one ``path_folding`` call in which ``Segments.affine`` ran, of all its passes;
1. fold/forward: ``path_folding`` time / the fastest plain forward of the same points (``model(points)`` in eval mode
   under ``torch.no_grad()``, the best of: all points in one batch, batches of 64, batches of 256), 4 paths x 33
   points;
2. exact/floor, for piecewise-linear networks (ReLU, max pooling, linear layers): ``path_folding(exact=True)`` time /
   ``path_folding`` at as many steps as the regions the exact traversal found (dense sampling's floor: one point
   per region crossed), on the first 1% of one path (a whole path crosses tens of thousands of regions). Networks
   whose exact traversal raises (smooth activations) are skipped with the error; a first traversal over 120 s is
   stopped and skipped; the transformer encoders (LayerNorm, softmax) are skipped without trying;
3. with ``--compile``: ``path_folding(compile=True)`` over the same fastest plain forward, in turns with eager
   ``path_folding`` (compiled/eager), the first compiled call's time (compile time: that minus the best later call),
   whether r1 and r2 per path and layer equal eager's, the module evaluated at the segments' ends, and the warning of
   a network measured eagerly instead.

Timing: the compared functions run in turns, once per repeat (after a warm-up), so that a busy machine slows all of
them alike, in a shuffled order and each timed call right after an untimed call of itself (``common.repeat_times``);
each ratio is taken within one repeat and reported as min/median/max over the repeats (for exact/floor, in a fixed
order, as many repeats as fit in 60 s, at least one). A final markdown table sums up. ``run(device="cuda")`` (used by
``cuda_check.py``) measures fold/forward on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from common import (
    best_times,
    exact_over_floor,
    fold_over_forward,
    parse_with_threads,
    plain_forwards,
    repeat_times,
    spread,
)
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_spacefold import compiled, find_layers, line, path_folding
from lightning_spacefold.line import AFFINE_MAPS, segment_points

PATHS, STEPS = 4, 32  # fold/forward: 4 paths x 33 points on the CPU (more with run(paths=...))
# Exact traversal: one path, over its first EXACT_FRACTION only. A whole path between two random 3x32x32 inputs
# crosses tens of thousands of regions (the U-Net 2,550 on a tenth of one, VGG-11 427 on a hundredth): minutes each
# on a 2-core CPU.
EXACT_PATHS = 1
EXACT_FRACTION = 0.01
EXACT_TIMEOUT_S = float(os.environ.get("ZOO_EXACT_TIMEOUT", 120))  # a first traversal over this is stopped, skipped
EXACT_BUDGET_S = 60.0  # repeats of exact/floor: as many as fit in this (at least 1, at most --repeats)
QUICK_NETWORKS = ("unet", "transformer_relu")


class UNet(nn.Module):
    """A small U-Net: two (conv + ReLU) x 2 + max-pool levels down, a bottleneck, and up again with skip connections.

    The deeper level goes up with a transposed convolution, the upper one with bilinear upsampling and a 1x1
    convolution; every operation is linear or ReLU or max pooling, so the network is piecewise linear.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 2, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.down1 = self.block(in_channels, w1)
        self.down2 = self.block(w1, w2)
        self.pool = nn.MaxPool2d(2)
        self.bottom = self.block(w2, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = self.block(2 * w2, w2)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(w2, w1, 1))
        self.dec1 = self.block(2 * w1, w1)
        self.head = nn.Conv2d(w1, out_channels, 1)

    @staticmethod
    def block(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        skip1 = self.down1(x)
        skip2 = self.down2(self.pool(skip1))
        bottom = self.bottom(self.pool(skip2))
        up2 = self.dec2(torch.cat([self.up2(bottom), skip2], dim=1))
        up1 = self.dec1(torch.cat([self.up1(up2), skip1], dim=1))
        return self.head(up1)


def transformer_encoder(activation: str) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model=128, nhead=4, dim_feedforward=512, activation=activation, batch_first=True, dropout=0.1
    )
    return nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    # The sizes of ViT-Tiny (as timm's vit_tiny_patch16_224), at 64x64 images.
    config = ViTConfig(
        image_size=64,
        patch_size=16,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
    )
    return ViTModel(config)


def hf_vit_forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda points: model(pixel_values=points).last_hidden_state


@dataclass(frozen=True)
class Network:
    """One network of the zoo: how to build it, its input shape, and whether it is piecewise linear."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    package: str | None = None  # the optional package it needs
    not_piecewise_linear: str | None = None  # why exact traversal does not apply (skipped without trying)
    make_forward: Callable[[nn.Module], Callable[[Tensor], Any]] | None = None  # forward= for path_folding


IMAGE = (3, 32, 32)  # CNNs: small enough for a 2-core CPU
VIT_IMAGE = (3, 64, 64)  # ViTs: 16 patches of 16x16
NETWORKS = (
    Network("resnet18", torchvision_model("resnet18"), IMAGE, "torchvision"),
    Network("mobilenet_v3_small", torchvision_model("mobilenet_v3_small"), IMAGE, "torchvision"),
    Network("efficientnet_b0", torchvision_model("efficientnet_b0"), IMAGE, "torchvision"),
    Network("vgg11_bn", torchvision_model("vgg11_bn"), IMAGE, "torchvision"),
    Network(
        "timm_vit_tiny",
        timm_model("vit_tiny_patch16_224", img_size=64),
        VIT_IMAGE,
        "timm",
    ),
    Network("timm_convnext_atto", timm_model("convnext_atto"), IMAGE, "timm"),
    Network("hf_vit", hf_vit, VIT_IMAGE, "transformers", make_forward=hf_vit_forward),
    Network(
        "transformer_relu",
        lambda: transformer_encoder("relu"),
        (32, 128),
        None,
        "LayerNorm and softmax attention",
    ),
    Network(
        "transformer_gelu",
        lambda: transformer_encoder("gelu"),
        (32, 128),
        None,
        "GELU, LayerNorm and softmax attention",
    ),
    Network("unet", UNet, IMAGE),
)
NETWORK_NAMES = tuple(network.name for network in NETWORKS)


@dataclass
class Row:
    """What one network's measurements give, for the final table."""

    name: str
    input_shape: tuple[int, ...]
    layers: int | None = None
    activations: str = ""
    units: int | None = None
    fold_forward: list[float] = field(default_factory=list)
    exact_floor: list[float] = field(default_factory=list)
    regions: list[int] = field(default_factory=list)
    note: str = ""
    exact_note: str = ""
    stem_module: str = ""
    stem_flops_share: float | None = None
    stem_time_share: float | None = None
    stem_note: str = ""
    shortcut: str = ""
    compiled_forward: list[float] = field(default_factory=list)
    compiled_eager: list[float] = field(default_factory=list)
    compile_first_s: float = 0.0
    compile_s: float = 0.0
    compile_note: str = ""
    compile_same: str = ""
    compile_affine: str = ""


def synchronized(function: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """The function, waiting for the device to finish its work before returning (for timing on a GPU)."""
    if device.type != "cuda":
        return function

    def run() -> object:
        result = function()
        torch.cuda.synchronize(device)
        return result

    return run


class ExactTimeoutError(Exception):
    """The exact traversal ran past :data:`EXACT_TIMEOUT_S`."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ExactTimeoutError` in the main thread after ``seconds`` (SIGALRM; no limit where there is none)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(_signum: int, _frame: object) -> None:
        raise ExactTimeoutError

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Operations that only ask about a tensor's shape or type (left out of what the points went through).
SHAPE_QUERIES = frozenset(
    {"__get__", "size", "dim", "__len__", "numel", "stride", "is_contiguous", "is_floating_point", "element_size"}
)
aten = torch.ops.aten
# The operations that affine maps run as (linear layers, convolutions, the projections inside attention).
PRODUCTS = frozenset(
    {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default}
)


class FirstAffine(TorchFunctionMode):
    """What the points go through up to the first affine map that a ``TorchFunctionMode`` sees (the line shortcut's
    view: calls inside another torch function, such as ``F.multi_head_attention_forward``, are not seen): the
    operations that took the points or a view of them, shape queries aside, and whether that map's input is theirs.

    Args:
        points: The tensor the forward pass receives.
    """

    def __init__(self, points: Tensor) -> None:
        super().__init__()
        self.storage = points.untyped_storage().data_ptr()
        self.path: list[str] = []
        self.found = False
        self.takes_points = False  # the first affine map's input is the points' memory (a view of them)

    def on_points(self, values: tuple[Any, ...]) -> bool:
        for value in values:
            for tensor in value if isinstance(value, list | tuple) else (value,):
                if isinstance(tensor, Tensor) and tensor.untyped_storage().data_ptr() == self.storage:
                    return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not self.found:
            name = getattr(func, "__name__", repr(func))
            if func in AFFINE_MAPS:
                self.found, self.takes_points = True, self.on_points(args[:1])
                self.path.append(name)
            elif self.on_points((*args, *kwargs.values())) and name not in SHAPE_QUERIES:
                self.path.append(name)
        return func(*args, **kwargs)


class FirstProduct(TorchDispatchMode):
    """The first matrix product or convolution of a forward pass (:data:`PRODUCTS`), as called: the first affine
    block's work, wherever it is called from."""

    def __init__(self) -> None:
        super().__init__()
        self.call: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.call is None and func in PRODUCTS:
            self.call = (func, args, kwargs)
        return func(*args, **kwargs)


def measure_first_affine(
    row: Row, model: nn.Module, run_model: Callable[[Tensor], Any], points: Tensor, repeats: int
) -> None:
    """The first affine block's share of the plain forward of ``points``: FLOPs (``FlopCounterMode``: matrix
    products, convolutions and attention; elementwise operations are not counted; with the recorders active,
    ``nn.TransformerEncoderLayer`` runs its unfused path) and time (its first matrix product
    or convolution alone, on the same input, over the forward in one batch: the best of ``repeats`` interleaved runs
    of each), and what the points go through before it (see :class:`FirstAffine`)."""
    recorder, product = FirstAffine(points), FirstProduct()
    with torch.no_grad(), recorder, FlopCounterMode(display=False) as whole, product:
        run_model(points)
    if product.call is None:
        row.stem_note = "no matrix product or convolution in the forward"
        print(f"  first affine block: {row.stem_note}")
        return
    func, args, kwargs = product.call
    with torch.no_grad(), FlopCounterMode(display=False) as first:
        func(*args, **kwargs)
    names = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters() if name.endswith("weight")}
    weights = [
        names[key] for arg in args if isinstance(arg, Tensor) and (key := arg.untyped_storage().data_ptr()) in names
    ]
    row.stem_module = weights[0].removesuffix(".weight").removesuffix("_weight") if weights else "?"
    row.stem_flops_share = first.get_total_flops() / whole.get_total_flops()

    def first_call() -> None:
        with torch.no_grad():
            func(*args, **kwargs)

    def forward() -> None:
        with torch.no_grad():
            run_model(points)

    first_best, forward_best = best_times(
        [synchronized(first_call, points.device), synchronized(forward, points.device)], repeats
    )
    row.stem_time_share = first_best / forward_best
    takes = "its input is the points" if recorder.takes_points else "its input is not the points"
    row.stem_note = f"{' -> '.join(recorder.path) or 'no affine map seen'} ({takes})"
    print(
        f"  first affine block: {row.stem_module} ({func.__name__}): {row.stem_flops_share:.1%} of the forward's "
        f"FLOPs ({first.get_total_flops() / len(points):,.0f} of {whole.get_total_flops() / len(points):,.0f} per "
        f"point), {row.stem_time_share:.1%} of its time (best of {repeats}: {first_best * 1e3:.1f} ms of "
        f"{forward_best * 1e3:.1f} ms, {len(points)} points in one batch); the points' way to the first affine map "
        f"seen at the function level: {row.stem_note}"
    )


@contextmanager
def counting_shortcuts() -> Iterator[Counter[str]]:
    """Count, while active, the forward passes of the sampled measurement (``LineShortcut.run``) and those that
    took the line shortcut (``Segments.affine``)."""
    counts: Counter[str] = Counter()
    run, affine = line.LineShortcut.run, line.Segments.affine

    def counted_run(self: line.LineShortcut, *args: Any, **kwargs: Any) -> Any:
        counts["passes"] += 1
        return run(self, *args, **kwargs)

    def counted_affine(self: line.Segments, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        counts["shortcuts"] += 1
        return affine(self, *args, **kwargs)

    line.LineShortcut.run, line.Segments.affine = counted_run, counted_affine  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        line.LineShortcut.run, line.Segments.affine = run, affine  # type: ignore[method-assign]


def measure_shortcut(
    row: Row, model: nn.Module, starts: Tensor, ends: Tensor, forward: Callable[[Tensor], Any] | None
) -> None:
    """How many forward passes of one ``path_folding`` call took the line shortcut."""
    with counting_shortcuts() as counts:
        path_folding(model, starts, ends, steps=STEPS, forward=forward)
    row.shortcut = f"{'yes' if counts['shortcuts'] else 'no'} ({counts['shortcuts']}/{counts['passes']} passes)"
    print(f"  line shortcut taken: {row.shortcut}")


def describe_layers(row: Row, model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any] | None) -> None:
    layers = find_layers(model, inputs, forward)
    row.layers = len(layers)
    row.units = sum(layer.num_units for layer in layers)
    row.activations = ", ".join(f"{count} {name}" for name, count in Counter(la.activation for la in layers).items())
    shown = ", ".join(layer.name for layer in layers[:4]) + (f", ..., {layers[-1].name}" if len(layers) > 4 else "")
    print(f"  activation layers: {len(layers)} ({row.activations}): {shown}")
    print(f"  units per point: {row.units:,}")


def measure_fold_forward(
    row: Row,
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    forward: Callable[[Tensor], Any] | None,
    repeats: int,
) -> None:
    ratios, fold_best, forward_best = fold_over_forward(
        model, starts, ends, STEPS, repeats, forward, lambda function: synchronized(function, starts.device)
    )
    row.fold_forward = ratios
    forwards = ", ".join(f"{label} {seconds:.3f} s" for label, seconds in forward_best.items())
    print(
        f"  fold/forward ({len(starts)} paths x {STEPS + 1} points): {spread(row.fold_forward)} over {repeats} "
        f"repeats (best times: path_folding {fold_best:.3f} s; plain forward in {forwards})"
    )


def measure_compiled(
    row: Row,
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    forward: Callable[[Tensor], Any] | None,
    repeats: int,
) -> None:
    """``path_folding(compile=True)`` over the fastest plain forward of the same points, with eager ``path_folding``
    in the same turns; the first compiled call's time (the compilation, mostly) and whether it fell back to eager."""
    device = starts.device
    eager_result = path_folding(model, starts, ends, steps=STEPS, forward=forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        begin = time.perf_counter()
        result = synchronized(
            lambda: path_folding(model, starts, ends, steps=STEPS, forward=forward, compile=True), device
        )()
        row.compile_first_s = time.perf_counter() - begin
    fallbacks = [str(warning.message) for warning in caught if "compile=True" in str(warning.message)]
    row.compile_note = "; ".join(fallbacks)
    values = [(getattr(result, name), getattr(eager_result, name)) for name in ("layer_r1", "layer_r2")]
    differ = sum(int((mine != theirs).sum()) for mine, theirs in values)
    count = sum(mine.numel() for mine, _ in values)
    row.compile_same = "r1, r2 per path and layer as eager" if differ == 0 else f"{differ} of {count} r1/r2 differ"
    steps = getattr(compiled, "_STEPS", {}).get(model)
    affine = sorted({str(step.affine) for step in steps.steps.values()}) if steps is not None else []
    row.compile_affine = ", ".join(affine) or "none (no compiled step)"
    points = segment_points(starts, ends, torch.arange(STEPS + 1, dtype=torch.float64, device=device) / STEPS)
    functions = [
        lambda: path_folding(model, starts, ends, steps=STEPS, forward=forward, compile=True),
        lambda: path_folding(model, starts, ends, steps=STEPS, forward=forward),
        *plain_forwards(model if forward is None else forward, points).values(),
    ]
    times = repeat_times([synchronized(function, device) for function in functions], repeats)
    row.compiled_forward = [fold / min(plain_times) for fold, _, *plain_times in times]
    row.compiled_eager = [fold / eager for fold, eager, *_ in times]
    best = [min(column) for column in zip(*times, strict=True)]
    row.compile_s = max(0.0, row.compile_first_s - best[0])
    print(
        f"  compiled fold/forward: {spread(row.compiled_forward)}, compiled/eager path_folding "
        f"{spread(row.compiled_eager)} over {repeats} repeats (best times: compiled {best[0]:.3f} s, eager "
        f"{best[1]:.3f} s, plain forward {min(best[2:]):.3f} s); first compiled call {row.compile_first_s:.1f} s "
        f"(compile time ~{row.compile_s:.1f} s); {row.compile_same}; affine module evaluated at the ends: "
        f"{row.compile_affine}{'; WARNING: ' + row.compile_note if row.compile_note else ''}"
    )


def measure_exact(
    row: Row,
    network: Network,
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    forward: Callable[[Tensor], Any] | None,
    repeats: int,
) -> None:
    if network.not_piecewise_linear is not None:
        row.exact_note = f"skipped: not piecewise linear ({network.not_piecewise_linear})"
        print(f"  exact/floor: {row.exact_note}")
        return
    ends = torch.lerp(starts, ends, EXACT_FRACTION)
    begin = time.perf_counter()
    try:
        with time_limit(EXACT_TIMEOUT_S):
            result = path_folding(model, starts, ends, exact=True, forward=forward)
    except ExactTimeoutError:
        row.exact_note = f"skipped: exact traversal took over {EXACT_TIMEOUT_S:.0f} s"
        print(f"  exact/floor: {row.exact_note}")
        return
    except ValueError as error:
        smooth = "smooth" in str(error)
        row.exact_note = f"skipped: {'smooth activations, ' if smooth else ''}exact=True raises ValueError"
        print(f"  exact/floor: skipped: path_folding(exact=True) raised ValueError: {error}")
        return
    first = time.perf_counter() - begin
    assert result.regions is not None
    row.regions = result.regions.tolist()
    exact_repeats = max(1, min(repeats, int(EXACT_BUDGET_S // first)))
    floor_steps, row.exact_floor, best = exact_over_floor(model, starts, ends, row.regions, exact_repeats, forward)
    print(
        f"  exact/floor ({len(starts)} path, its first {EXACT_FRACTION:.0%}: {'/'.join(map(str, row.regions))} "
        f"regions, floor steps={floor_steps}): {spread(row.exact_floor)} over {exact_repeats} repeats (best times: "
        f"exact {best[0]:.2f} s, steps={floor_steps} {best[1]:.2f} s; first exact call {first:.2f} s)"
    )


def measure(
    network: Network, device: torch.device, repeats: int, exact: bool, paths: int, compile: bool = False
) -> Row:
    row = Row(network.name, network.input_shape)
    print(f"{network.name} ({'x'.join(map(str, network.input_shape))} inputs)", flush=True)
    if network.package is not None and importlib.util.find_spec(network.package) is None:
        row.note = f"skipped: {network.package} is not installed (pip install -e '.[zoo]')"
        print(f"  {row.note}")
        return row
    torch.manual_seed(0)
    model = network.build().to(device).eval()
    forward = None if network.make_forward is None else network.make_forward(model)
    starts = torch.randn(paths, *network.input_shape, device=device)
    ends = torch.randn(paths, *network.input_shape, device=device)
    describe_layers(row, model, starts[:2], forward)
    points = segment_points(starts, ends, torch.arange(STEPS + 1, dtype=torch.float64, device=device) / STEPS)
    measure_first_affine(row, model, model if forward is None else forward, points, repeats)
    measure_shortcut(row, model, starts, ends, forward)
    measure_fold_forward(row, model, starts, ends, forward, repeats)
    if compile:
        measure_compiled(row, model, starts, ends, forward, repeats)
    if exact:
        measure_exact(row, network, model, starts[:EXACT_PATHS], ends[:EXACT_PATHS], forward, repeats)
    return row


def table(rows: list[Row]) -> str:
    """The results as a markdown table."""
    lines = [
        "| network | input | activation layers | units/point | first affine block: FLOP share, time share "
        "| shortcut taken | fold/forward min-median-max | exact/floor min-median-max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        shape = "x".join(map(str, row.input_shape))
        if row.layers is None:
            lines.append(f"| {row.name} | {shape} | | | | | {row.note} | |")
            continue
        exact = row.exact_note or "not measured"
        if row.exact_floor:
            exact = f"{spread(row.exact_floor)} ({'/'.join(map(str, row.regions))} regions)"
        layers = f"{row.layers} ({row.activations})"
        stem = row.stem_note
        if row.stem_flops_share is not None and row.stem_time_share is not None:
            stem = f"{row.stem_flops_share:.1%}, {row.stem_time_share:.1%} ({row.stem_module})"
        lines.append(
            f"| {row.name} | {shape} | {layers} | {row.units:,} | {stem} | {row.shortcut} | {spread(row.fold_forward)} "
            f"| {exact} |"
        )
    return "\n".join(lines)


def compiled_table(rows: list[Row]) -> str:
    """The compiled measurement as a markdown table."""
    lines = [
        "| network | compiled fold/forward min-median-max | eager fold/forward min-median-max "
        "| compiled/eager min-median-max | first compiled call (compile time) | same results | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not row.compiled_forward:
            lines.append(f"| {row.name} | {row.note or 'not measured'} | | | | | |")
            continue
        lines.append(
            f"| {row.name} | {spread(row.compiled_forward)} | {spread(row.fold_forward)} "
            f"| {spread(row.compiled_eager)} | {row.compile_first_s:.1f} s (~{row.compile_s:.1f} s) "
            f"| {row.compile_same} "
            f"| affine at the ends: {row.compile_affine}{'; ' + row.compile_note if row.compile_note else ''} |"
        )
    return "\n".join(lines)


def run(
    device: str = "cpu",
    quick: bool = False,
    networks: list[str] | None = None,
    repeats: int | None = None,
    exact: bool | None = None,
    paths: int = PATHS,
    compile: bool = False,
) -> list[Row]:
    """Measure the zoo on ``device``; print each network's figures and a final markdown table.

    Args:
        device: Where the models and points live (``"cpu"``, ``"cuda"``).
        quick: Only :data:`QUICK_NETWORKS` (unless ``networks`` names others) and 2 repeats (unless ``repeats``).
        networks: Names from :data:`NETWORK_NAMES`; all by default.
        repeats: Interleaved repeats per ratio; 5 by default, 2 when ``quick``.
        exact: Measure exact/floor; by default on the CPU only.
        paths: Paths (of 33 points each) for fold/forward.
        compile: Also measure ``path_folding(compile=True)`` against the same plain forward (and the eager
            measurement), with its first call's time.

    Returns:
        One row per network, as in the table.
    """
    unknown = sorted(set(networks or ()) - set(NETWORK_NAMES))
    if unknown:
        raise SystemExit(f"unknown networks {unknown}; choose from {', '.join(NETWORK_NAMES)}")
    names = networks or (QUICK_NETWORKS if quick else NETWORK_NAMES)
    repeats = repeats or (2 if quick else 5)
    target = torch.device(device)
    exact = target.type == "cpu" if exact is None else exact
    where = torch.cuda.get_device_name(target) if target.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {target} ({where}), {repeats} repeats, float32 weights and inputs")
    # torch's forward-mode AD (used by exact=True) scripts its decompositions with the deprecated torch.jit.script.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
    begin = time.perf_counter()
    rows = [measure(network, target, repeats, exact, paths, compile) for network in NETWORKS if network.name in names]
    print(f"\nzoo on {target}: {time.perf_counter() - begin:.0f} s in all\n")
    print(table(rows))
    if compile:
        print()
        print(compiled_table(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"2 repeats and only {', '.join(QUICK_NETWORKS)}")
    parser.add_argument("--networks", help=f"comma-separated names from: {', '.join(NETWORK_NAMES)}")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per ratio (default 5, 2 with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--paths", type=int, default=PATHS, help=f"paths for fold/forward (default {PATHS})")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact/floor ratio")
    parser.add_argument(
        "--compile", action="store_true", help="also measure path_folding(compile=True) and its compile time"
    )
    args = parse_with_threads(parser)
    networks = None if args.networks is None else [name.strip() for name in args.networks.split(",") if name.strip()]
    run(args.device, args.quick, networks, args.repeats, False if args.no_exact else None, args.paths, args.compile)


if __name__ == "__main__":
    main()
