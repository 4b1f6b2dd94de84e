"""The chunked loss from hidden states (dsft/loss.py) against the full-logits path: the same
loss and the same gradient for every parameter, fp32, in one process. The multi-rank ZeRO
stages are tests/integration/test_fused_loss.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsft import loss
from dsft.config import LoraConfig
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.tokenize import Tokenized
from dsft.model import apply_lora
from dsft.synthetic import build_model_dir


def _examples(n: int = 6, vocab: int = 90) -> list[Tokenized]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        length = 9 + 5 * i % 13
        ids = torch.randint(7, vocab, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Tokenized(ids, [-100] * cut + ids[cut:]))
    return out


def _batch(packed: bool) -> dict[str, torch.Tensor]:
    exs = _examples()
    b = collate_packed([exs[:3], exs[3:]], 0) if packed else collate(exs, 0)
    b.pop("lengths")
    return b


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = {"hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}  # fmt: skip
    return build_model_dir(tmp_path_factory.mktemp("untied") / "m", shape=shape)


def _load(path: Path, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if variant == "frozen_head":
        model.lm_head.weight.requires_grad_(False)
    if variant == "lora_head":  # adapters on the head itself: the module path, checkpointed
        lora = LoraConfig(
            enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"]
        )
        model = apply_lora(model, lora)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    if variant == "lora":
        # the head trained in full next to the adapters: peft wraps it in its own module
        lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
        model = apply_lora(model, lora)
        # a nonzero B so the adapters change the output (peft starts them at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    return model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", ["tied", "untied", "frozen_head", "lora", "lora_head"])
def test_fused_loss_and_every_gradient_equal_full_logits(
    variant: str, packed: bool, tiny_model: Path, untied_model: Path
) -> None:
    model = _load(tiny_model if variant == "tied" else untied_model, variant)
    batch = _batch(packed)
    labels = batch.pop("labels")

    full = loss.logits_nll(model(**batch, use_cache=False).logits, labels)
    full.backward()
    ref = _grads(model)

    index, targets = loss.target_index(labels)
    # several uneven chunks (the tiny vocabulary would make one)
    fused, _ = loss.fused_nll(model, loss.output_head(model), batch, index, targets, chunks=3)
    fused.backward()
    got = _grads(model)

    assert fused.item() == pytest.approx(full.item(), rel=1e-5)
    assert ref.keys() == got.keys() and ref
    # the untied head has a gradient unless frozen (the tied one is the embedding's)
    assert any("lm_head" in n for n in ref) == (variant in ("untied", "lora", "lora_head"))
    assert (loss.head_linear(loss.output_head(model).module) is None) == (variant == "lora_head")
    assert variant != "lora" or any("lora_A" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_per_token_stats_and_weight_head(tiny_model: Path) -> None:
    """Evaluation's per-token NLL and argmax hits; a bare weight works as the head; an
    ignored target inside the selection counts for nothing."""
    model = _load(tiny_model, "tied")
    batch = _batch(False)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
        hidden = loss.final_hidden(model, batch)[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    nll, right = loss.chunked_nll(hidden[mask], target[mask], model.lm_head, 4, per_token=True)
    ref = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="none")
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(right, logits[mask].argmax(-1) == target[mask])
    # all positions, ignored ones included, through the weight itself
    s, _ = loss.chunked_nll(hidden, target, model.lm_head.weight)
    assert s.item() == pytest.approx(ref.sum().item(), rel=1e-5)


def test_target_index_is_the_shifted_mask() -> None:
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, 8]])
    index, ids = loss.target_index(labels)
    # row 0: positions 1, 2 predict 5, 6; row 1: positions 0 and 2 predict 7 and 8
    assert index.tolist() == [1, 2, 4, 6] and ids.tolist() == [5, 6, 7, 8]


def test_chunk_counts() -> None:
    assert loss.chunk_rows(128256) == 523
    assert loss.num_chunks(0, 128256) == 1
    assert loss.num_chunks(1046, 128256) == 2 and loss.num_chunks(1047, 128256) == 3
    assert loss.lockstep_chunks([10, 2000], 128256, lockstep=False) == [1, 4]
