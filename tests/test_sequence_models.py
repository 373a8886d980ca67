"""Token models: paths between embeddings (forward=, embedding_fn/forward_fn), SwiGLU, Hugging Face GPT-2 and LLaMA."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spacefold import (
    SpaceFolding,
    SpaceFoldingCallback,
    find_layers,
    path_folding,
    path_patterns,
    register_swiglu,
    soft_folding,
)
from tests.test_callback import logged_on_one_and_two_processes, trainer
from tests.test_finite import tent


class TokenTent(pl.LightningModule):
    """Tokens 0, 1, 2 embedded at 0.0, 1.0, 0.5 in one dimension, then the hand-computed tent of test_finite.

    With bits [x > 0.3, x > 0.7 | (x - 0.3)^+ - 3 (x - 0.7)^+ > 0.1], the embedding segment 0 -> 1 walks 000, 100
    (x > 0.3), 101 (x > 0.4), 111 (x > 0.7), 110 (x > 0.85): r1 = 3, r2 = 4, chi = 1/4; back from 1 to 0, r1 = 2 and
    chi = 1/2. From 0.5 to 1 (101, 111, 110) and from 0.5 to 0 (101, 100, 000) no unit switches twice: chi = 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(3, 1)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.tensor([[0.0], [1.0], [0.5]]))
        self.net = tent()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)  # [B, 1] -> [B, 1, 1]

    def head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings.flatten(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        return F.mse_loss(self(tokens).squeeze(-1), targets.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


TOKENS = torch.tensor([[0], [1], [2]])


def between_embeddings(**kwargs) -> SpaceFoldingCallback:
    """A callback measuring TokenTent between the embeddings of the three tokens (labelled by themselves)."""
    arguments = {
        "steps": 16,
        "probe_dataset": TensorDataset(TOKENS, torch.tensor([0, 1, 2])),
        "embedding_fn": "embed",
        "forward_fn": "head",
    }
    return SpaceFoldingCallback(**{**arguments, **kwargs})


def token_data() -> DataLoader:
    return DataLoader(TensorDataset(TOKENS.repeat(4, 1), torch.tensor([0, 1, 2] * 4)), batch_size=6)


def test_path_folding_between_embeddings_by_hand() -> None:
    model = TokenTent()
    starts, ends = model.embed(torch.tensor([[0], [1], [2], [2]])), model.embed(torch.tensor([[1], [0], [1], [0]]))
    result = path_folding(model, starts, ends, steps=16, forward=model.head)
    assert result.chi.tolist() == [0.25, 0.5, 0.0, 0.0]
    assert result.layer_names == ["net.1", "net.4"]
    patterns = path_patterns(model, starts[:1], ends[:1], steps=4, forward=model.head)
    assert patterns[0].int().tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]]  # t = 0, 1/4, ...
    exact = path_folding(model.double(), starts.double(), ends.double(), exact=True, forward=model.head)
    assert exact.chi.tolist() == [0.25, 0.5, 0.0, 0.0] and exact.regions.tolist() == [5, 5, 3, 3]
    metric = SpaceFolding(steps=16)
    metric.update(model.float(), starts, ends, forward=model.head)
    assert metric.compute()["folding"].item() == pytest.approx(0.1875)
    soft = soft_folding(model, starts, ends, steps=16, forward=model.head)
    torch.testing.assert_close(soft, torch.tensor([0.25, 0.5, 0.0, 0.0]), atol=0.03, rtol=0)
    with pytest.raises(TypeError, match="`forward` must be None"):
        path_folding(model, starts, ends, forward="head")


def test_the_callback_measures_between_embeddings(tmp_path: Path) -> None:
    callback = between_embeddings(every_n_train_steps=2, num_pairs=3, pairing="class", include_same_class=False)
    model = TokenTent()
    trainer(tmp_path, callback, max_steps=2, limit_val_batches=0).fit(model, train_dataloaders=token_data())
    assert callback.latest_step == 2
    # The probe set is kept as token ids; 3 of the 6 ordered class pairs (label = token) are measured between the
    # current embeddings, whose chi the tent gives by hand.
    probe = callback._drawn
    assert sorted(probe.inputs.flatten().tolist()) == [0, 1, 2] and torch.equal(probe.inputs.flatten(), probe.labels)
    pairs = callback._pair(model.embed(probe.inputs).detach(), probe.labels)
    expected = {(0, 1): 0.25, (1, 0): 0.5, (0, 2): 0.0, (2, 0): 0.0, (1, 2): 0.0, (2, 1): 0.0}
    values = [expected[(int(a), int(b))] for a, b in zip(pairs.start_labels, pairs.end_labels, strict=True)]
    assert callback.latest_result.chi.tolist() == values
    assert callback.latest_metrics["spacefold/folding"] == pytest.approx(sum(values) / 3)


class Shift(TokenTent):
    """The embedding moves in every training step: paths must follow the current embedding."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            self.embedding.weight.mul_(-1)
        return super().training_step(batch, batch_idx)


def test_the_callback_embeds_with_the_current_model(tmp_path: Path) -> None:
    # Embeddings 0 and -1: the tent is flat below 0, so once negated no path folds.
    callback = between_embeddings(
        every_n_train_steps=1,
        num_pairs=2,
        pairing="random",
        probe_dataset=TensorDataset(TOKENS[:2], torch.tensor([0, 1])),
        log_figures=False,
    )
    trainer(tmp_path, callback, max_steps=1, limit_val_batches=0, logger=False).fit(
        Shift(), train_dataloaders=token_data()
    )
    assert callback.latest_step == 1 and callback.latest_result.chi.tolist() == [0.0, 0.0]


class DroppedTent(TokenTent):
    """TokenTent whose embedding ends in dropout with p = 1: in train mode every embedding is 0, in eval mode kept."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=1.0)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(super().embed(tokens))


def test_the_callback_embeds_the_probe_set_in_eval_mode(tmp_path: Path) -> None:
    # Embedded in train mode, both paths would shrink to the point 0 (chi 0): dropout would be measured, not the model.
    callback = between_embeddings(
        every_n_train_steps=1,
        num_pairs=2,
        pairing="class",
        include_same_class=False,
        probe_dataset=TensorDataset(TOKENS[:2], torch.tensor([0, 1])),
        log_figures=False,
    )
    model = DroppedTent()
    trainer(tmp_path, callback, max_steps=1, limit_val_batches=0, logger=False).fit(
        model, train_dataloaders=token_data()
    )
    assert callback.latest_step == 1 and sorted(callback.latest_result.chi.tolist()) == [0.25, 0.5]  # 0 -> 1, 1 -> 0
    assert model.dropout.training  # train mode again after the measurement


def test_the_regulariser_runs_between_embeddings(tmp_path: Path) -> None:
    callback = between_embeddings(
        every_n_train_steps=0,
        num_pairs=3,
        steps=8,
        pairing="random",
        regularize=True,
        reg_num_pairs=4,
        reg_steps=16,
        log_figures=False,
    )
    fitted = trainer(tmp_path, callback, max_steps=1, limit_val_batches=0, logger=False)
    fitted.fit(TokenTent(), train_dataloaders=token_data())
    assert fitted.callback_metrics["spacefold/reg_term"].item() < 0  # some pair of the batch folds


def test_token_inputs_without_embedding_fn_say_what_to_set(tmp_path: Path) -> None:
    callback = SpaceFoldingCallback(num_pairs=2, steps=8, probe_dataset=TensorDataset(TOKENS, torch.tensor([0, 1, 2])))
    with pytest.raises(TypeError, match="floating-point tensor.*`embedding_fn`"):
        trainer(tmp_path, callback, max_steps=1, limit_val_batches=0).fit(TokenTent(), train_dataloaders=token_data())
    wrong = SpaceFoldingCallback(embedding_fn="embedd", probe_dataset=TensorDataset(TOKENS, torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="`embedding_fn='embedd'` is not a method of TokenTent"):
        trainer(tmp_path, wrong, max_steps=1, limit_val_batches=0).fit(TokenTent(), train_dataloaders=token_data())
    with pytest.raises(TypeError, match="forward_fn"):
        SpaceFoldingCallback(forward_fn=42)


class GatedMLP(nn.Module):
    """One SwiGLU unit on a 1-D input: u = x, v = x - 1/2, output = silu(u) * v."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1)
        with torch.no_grad():
            for layer, bias in ((self.gate_proj, 0.0), (self.up_proj, -0.5), (self.down_proj, 0.0)):
                layer.weight.fill_(1.0)
                layer.bias.fill_(bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_swiglu_has_the_papers_bit() -> None:
    # From x = -1 to 1: u, v < 0 (same sign, bit 1), then u > 0 > v (bit 0), then both > 0 (bit 1): the walk returns
    # to its start, r1 = 1, r2 = 2, chi = 1/2. The SiLU alone (bit u > 0) switches once: chi = 0.
    starts, ends = torch.tensor([[-1.0]]), torch.tensor([[1.0]])
    model = GatedMLP()
    assert path_folding(model, starts, ends, steps=16).chi.tolist() == [0.0]
    assert register_swiglu(model) == ["down_proj"]
    assert [(layer.name, layer.activation) for layer in find_layers(model, starts)] == [("down_proj", "SwiGLU")]
    result = path_folding(model, starts, ends, steps=16)
    assert result.chi.tolist() == [0.5] and (result.r1.item(), result.r2.item()) == (1, 2)
    # chi is the same with every bit inverted; the patterns are not. At x = -1, -0.6, -0.2, 0.2, 0.6, 1: u and v of
    # one sign, except at x = 0.2 (u > 0 > v).
    patterns = path_patterns(model, starts, ends, steps=5)
    assert patterns.flatten().tolist() == [True, True, True, False, True, True]
    with pytest.raises(ValueError, match="No submodule of GatedMLP is named 'w2'"):
        register_swiglu(model, "w2")
    with pytest.raises(ValueError, match="not piecewise linear|smooth"):
        path_folding(model, starts, ends, exact=True)


def hidden_inputs(model: nn.Module, names: list[str]) -> dict[str, list[torch.Tensor]]:
    """What enters (``:in``) or leaves (``:out``) the named modules, recorded by plain hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        module_name, _, side = name.partition(":")
        if side == "in":
            handles.append(modules[module_name].register_forward_pre_hook(lambda _m, a, n=name: seen[n].append(a[0])))
        else:
            handles.append(modules[module_name].register_forward_hook(lambda _m, _a, o, n=name: seen[n].append(o)))
    return seen, handles


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=20)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=20,
        max_position_embeddings=8,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_gpt2_layers_are_named_after_their_activation_and_give_its_bits() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    tokens = torch.randint(0, 20, (2, 5))
    starts, ends = model.transformer.wte(tokens).detach().unbind(0)
    starts, ends = starts[None], ends[None]

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeddings).logits

    layers = find_layers(model, starts, forward)
    assert [(layer.name, layer.activation, layer.num_units) for layer in layers] == [
        ("transformer.h.0.mlp.act", "F.tanh in NewGELUActivation", 5 * 64),
        ("transformer.h.1.mlp.act", "F.tanh in NewGELUActivation", 5 * 64),
    ]
    patterns = path_patterns(model, starts, ends, steps=8, forward=forward)
    seen, handles = hidden_inputs(model, ["transformer.h.0.mlp.c_fc:out", "transformer.h.1.mlp.c_fc:out"])
    with torch.no_grad():
        forward(torch.lerp(starts, ends, (torch.arange(9) / 8).view(-1, 1, 1)))
    for handle in handles:
        handle.remove()
    bits = torch.cat([seen[name][0].flatten(1) > 0 for name in seen], dim=1)
    assert torch.equal(patterns[0], bits) and bits.any() and not bits.all()
    result = path_folding(model, starts, ends, steps=8, forward=forward)
    assert result.r2.item() == (bits[1:] != bits[:-1]).sum().item() > 0


def test_llama_swiglu_units_are_the_products_signs() -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert register_swiglu(model) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    tokens = torch.randint(0, 20, (2, 4))
    starts, ends = (embedding[None] for embedding in model.model.embed_tokens(tokens).detach().unbind(0))

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeddings).logits

    layers = find_layers(model, starts, forward)
    assert [(layer.name, layer.activation, layer.num_units) for layer in layers] == [
        ("model.layers.0.mlp.down_proj", "SwiGLU", 4 * 24),
        ("model.layers.1.mlp.down_proj", "SwiGLU", 4 * 24),
    ]
    names = [f"model.layers.{i}.mlp.{part}:out" for i in (0, 1) for part in ("gate_proj", "up_proj")]
    seen, handles = hidden_inputs(model, names)
    with torch.no_grad():
        forward(torch.lerp(starts, ends, (torch.arange(9) / 8).view(-1, 1, 1)))
    for handle in handles:
        handle.remove()
    same_sign = [
        (F.silu(seen[f"model.layers.{i}.mlp.gate_proj:out"][0]) * seen[f"model.layers.{i}.mlp.up_proj:out"][0] > 0)
        for i in (0, 1)
    ]
    bits = torch.cat([value.flatten(1) for value in same_sign], dim=1)
    patterns = path_patterns(model, starts, ends, steps=8, forward=forward)
    assert torch.equal(patterns[0], bits) and bits.any() and not bits.all()


@pytest.mark.timeout(180)
def test_ddp_between_embeddings_logs_the_same_values_as_one(tmp_path: Path) -> None:
    logged, _ = logged_on_one_and_two_processes(
        tmp_path,
        lambda: between_embeddings(
            every_n_train_steps=2, num_pairs=6, pairing="class", include_same_class=False, log_figures=False
        ),
        lambda run: run.fit(TokenTent(), train_dataloaders=token_data()),
        limit_val_batches=0,
    )
    # All 6 ordered class pairs of the three tokens: chi 1/4 and 1/2 for 0 <-> 1, 0 for the other four.
    assert logged[0][2]["spacefold/folding"] == pytest.approx(0.125)
    assert logged[1] == logged[0]
