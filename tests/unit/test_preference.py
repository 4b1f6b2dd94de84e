"""Preference data (formats, masks, prompt check), losses against TRL's formulas, packing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsft.config import PreferenceConfig
from dsft.data.pairs import read_pairs, tokenize_pairs
from dsft.data.template import ChatOptions
from dsft.errors import DataError
from dsft.preference import (
    SUMS,
    collate_pairs,
    kto_losses,
    pair_losses,
    sequence_logps,
    step_metrics,
)
from dsft.synthetic import build_tokenizer

U = {"role": "user", "content": "Add 1+2"}


def _write(tmp: Path, rows: list, name: str = "p.jsonl") -> Path:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scored(tok, t) -> str:
    return tok.decode([x for x in t.labels if x != -100])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_formats_share_prompt_and_score_only_the_response(tmp_path: Path, tok) -> None:
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    rows = [
        {"prompt": [U], "chosen": [a("3")], "rejected": [a("4")]},  # TRL conversational
        {"prompt": "Add 1+2", "chosen": [a("3")], "rejected": [a("4")]},  # prompt string
        {"chosen": [U, a("3")], "rejected": [U, a("4")]},  # implicit prompt
        {  # ms-swift, multi-turn: the earlier assistant turn is prompt, not scored
            "messages": [{"role": "system", "content": "S"}, U, a("3"), U, a("3")],
            "rejected_response": "33",
        },
        {"prompt": "Q: 1+2 =", "chosen": " 3", "rejected": " 4"},  # TRL standard
        {"chosen": "Q: 1+2 = 3", "rejected": "Q: 1+2 = 4"},  # standard, implicit
    ]
    pairs, stats = tokenize_pairs(tok, read_pairs([str(_write(tmp_path, rows))]), ChatOptions(), 99)
    assert stats == {"truncated": 0, "dropped_no_target": 0} and len(pairs) == 6
    scored = [(_scored(tok, p.chosen), _scored(tok, p.rejected)) for p in pairs]
    assert scored[:4] == [("3<|end|>", "4<|end|>")] * 3 + [("3<|end|>", "33<|end|>")]
    assert scored[4:] == [(" 3<|end|>", " 4<|end|>")] * 2
    for p in pairs:  # the same prompt tokens on both sides, then the response
        k = next(i for i, x in enumerate(p.chosen.labels) if x != -100)
        assert p.chosen.input_ids[:k] == p.rejected.input_ids[:k]
    assert tok.decode(pairs[3].chosen.input_ids).count("<|assistant|>3<|end|>") == 2


def test_kto_rows(tmp_path: Path, tok) -> None:
    rows = [
        {"prompt": "Q", "completion": " yes", "label": True},
        {"prompt": [U], "completion": [{"role": "assistant", "content": "4"}], "label": False},
    ]
    pairs, _ = tokenize_pairs(tok, read_pairs([str(_write(tmp_path, rows))]), ChatOptions(), 99)
    assert [p.rejected for p in pairs] == [None, None]
    assert [p.label for p in pairs] == [True, False]
    assert _scored(tok, pairs[1].chosen) == "4<|end|>"


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": [U], "chosen": [{"role": "assistant", "content": "3"}]}, "missing field"),
        ({"prompt": [U], "chosen": "3", "rejected": [U]}, "both be strings or both be lists"),
        ({"prompt": [U], "chosen": [U], "rejected": [U]}, "no assistant message"),
        ({"messages": [U], "rejected_response": "x"}, "no assistant message"),
        ({"prompt": "q", "completion": "c", "label": "yes"}, "must be true or false"),
        ({"foo": 1}, "not a preference row"),
    ],
)
def test_bad_rows_are_located(tmp_path: Path, row: dict, message: str) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{message}"):
        read_pairs([str(path)])


def test_prompts_that_render_differently_are_a_located_error(tmp_path: Path) -> None:
    tok = build_tokenizer()
    # a template whose header depends on the final answer: the two prompts differ
    tok.chat_template = (
        "{{ bos_token }}{% if '4' in messages[-1]['content'] %}!{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    rows = [{"prompt": [U], "chosen": [a("3")], "rejected": [a("5")]}]
    rows.append({"prompt": [U], "chosen": [a("3")], "rejected": [a("4")]})
    with pytest.raises(DataError, match=r"p\.jsonl:2: chosen and rejected render different"):
        tokenize_pairs(tok, read_pairs([str(_write(tmp_path, rows))]), ChatOptions(), 99)


# --------------------------------------------------------------------------- losses vs TRL


def _logps(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(n, generator=g) * 20 - 1, -torch.rand(n, generator=g) * 20 - 1
    rc, rr = pc + torch.randn(n, generator=g), pr + torch.randn(n, generator=g)
    nc, nr = torch.randint(2, 9, (n,), generator=g).float(), torch.randint(2, 9, (n,)).float()
    return pc, pr, rc, rr, nc, nr


def test_cpo_simpo_loss_equals_trl() -> None:
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _, nc, nr = _logps()
    for eps in (0.0, 0.2):
        cfg = PreferenceConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=eps)
        ours = pair_losses(cfg, pc, pr, None, None, nc, nr)
        stub = SimpleNamespace(
            alpha=0.0,
            loss_type="simpo",
            simpo_gamma=0.7,
            beta=2.0,
            label_smoothing=eps,
            accelerator=SimpleNamespace(device="cpu"),
        )
        losses, cr, rj = CPOTrainer.cpo_loss(stub, pc / nc, pr / nr)  # TRL averages the logps
        torch.testing.assert_close(ours.losses, losses, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.chosen_rewards, cr)
        torch.testing.assert_close(ours.rejected_rewards, rj)


def test_orpo_odds_ratio_equals_trl() -> None:
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, _, _, nc, nr = _logps(seed=1)
    pc, pr = pc / 10, pr / 10  # per-token averages near 0: the log1mexp edge
    cfg = PreferenceConfig(loss_type="orpo", orpo_lambda=0.25)
    ours = pair_losses(cfg, pc, pr, None, None, nc, nr)
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, cr, _, _, _ = ORPOTrainer.odds_ratio_loss(stub, pc / nc, pr / nr)
    torch.testing.assert_close(ours.losses, -losses, rtol=1e-6, atol=1e-7)  # TRL: loss = nll - it
    torch.testing.assert_close(ours.chosen_rewards, cr)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo"])
def test_dpo_family_formulas(kind: str) -> None:
    """The formulas of TRL 1.16's DPOTrainer._compute_loss (and cDPO's label smoothing)."""
    import torch.nn.functional as F

    pc, pr, rc, rr, nc, nr = _logps(seed=2)
    beta, eps = 0.3, 0.1 if kind in ("sigmoid", "robust") else 0.0
    d = (pc - rc) - (pr - rr)
    want = {
        "sigmoid": -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d),
        "robust": (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d))
        / (1 - 2 * eps),
        "hinge": torch.relu(1 - beta * d),
        "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2,
    }[kind]
    cfg = PreferenceConfig(loss_type=kind, beta=beta, label_smoothing=eps)
    got = pair_losses(cfg, pc, pr, rc, rr, nc, nr)
    torch.testing.assert_close(got.losses, want)
    torch.testing.assert_close(got.chosen_rewards, beta * (pc - rc))


def test_kto_loss() -> None:
    cfg = PreferenceConfig(loss_type="kto", beta=0.5, kto_undesirable_weight=2.0)
    pol, ref = torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -3.0])
    losses, rewards = kto_losses(cfg, pol, ref, torch.tensor([True, False]), torch.tensor(0.2))
    want = [
        1 - torch.sigmoid(torch.tensor(0.5 * (0.5 - 0.2))),
        2 * (1 - torch.sigmoid(torch.tensor(0.5 * (0.2 + 1.0)))),
    ]
    torch.testing.assert_close(losses, torch.stack(want))
    torch.testing.assert_close(rewards, torch.tensor([0.25, -0.5]))


def test_metrics_are_ratios_of_sums() -> None:
    """Sums over pairs add across ranks and micro-batches: the mean is the same however
    the pairs are split (here 2 + 3 pairs vs 5)."""
    cfg = PreferenceConfig()
    one = dict.fromkeys(SUMS, 0.0) | {"loss": 1.0, "pairs": 2, "rewards/accuracy": 1}
    two = dict.fromkeys(SUMS, 0.0) | {"loss": 2.5, "pairs": 3, "rewards/accuracy": 3}
    both = {k: one[k] + two[k] for k in SUMS}
    m = step_metrics([both[k] for k in SUMS], cfg)
    assert m["loss"] == pytest.approx(3.5 / 5) and m["rewards/accuracy"] == pytest.approx(4 / 5)


# --------------------------------------------------------------------------- packing


def test_packed_pairs_equal_unpacked(tmp_path: Path, tiny_model: Path, tok) -> None:
    """Both sides of several pairs in packed rows: the same per-sequence log-probs, loss and
    gradients as the padded batch (attention never crosses a sequence)."""
    from transformers import AutoModelForCausalLM

    from dsft.loss import output_head
    from dsft.synthetic import generate_preference_pairs

    rows = generate_preference_pairs(6, seed=3)
    pairs, _ = tokenize_pairs(tok, read_pairs([str(_write(tmp_path, rows))]), ChatOptions(), 99)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    head = output_head(model)
    cfg = PreferenceConfig()
    ref = torch.randn(12) - 20

    def run(batch, fused=False):
        model.zero_grad()
        logps, counts, nll = sequence_logps(model, head, batch, torch.device("cpu"), fused)
        terms = pair_losses(cfg, logps[:6], logps[6:], ref[:6], ref[6:], counts[:6], counts[6:])
        loss = terms.losses.sum() + nll
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return logps.detach(), loss.detach(), grads

    plain = run(collate_pairs(pairs, tok.pad_token_id))
    packed_batch = collate_pairs(pairs, tok.pad_token_id, rows=[[0, 1, 2], [3, 4], [5]])
    assert packed_batch["input_ids"].shape[0] == 3 and "attention_mask" not in packed_batch
    packed = run(packed_batch)
    fused = run(packed_batch, fused=True)  # train.fused_loss: chunked, recomputed in backward
    for other in (packed, fused):
        for a, b in zip(plain, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(plain[1]))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_logps_equal_log_softmax(monkeypatch: pytest.MonkeyPatch, softcap) -> None:
    """train.fused_loss's per-token log-probs over 3 chunks: the values and the gradients
    (of a weighted sum, as a preference loss weighs each sequence) of the hidden states and
    the head's weight equal log_softmax over the full logits."""
    from dsft import loss

    monkeypatch.setattr(loss, "num_chunks", lambda n, vocab: 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 40, (50,))
    weights = torch.randn(50)

    def run(fused: bool):
        head.zero_grad()
        hidden.grad = None
        if fused:
            lp = loss.chunked_logps(hidden, targets, head, softcap)
        else:
            z = head(hidden).float()
            z = softcap * torch.tanh(z / softcap) if softcap else z
            lp = torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]
        (lp * weights).sum().backward()
        return lp.detach(), hidden.grad.clone(), head.weight.grad.clone()

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["kto", "orpo", "simpo", "sigmoid"])
def test_step_runs_every_loss(tmp_path: Path, tiny_model: Path, tok, kind: str) -> None:
    """One micro-batch through PreferenceStep on a plain model: finite loss, gradients,
    and the metric sums (KTO: mismatched KL sequences; sigmoid: live reference = the
    LoRA adapter switched off, so the rewards start at exactly zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dsft.loss import output_head
    from dsft.preference import PreferenceStep

    if kind == "kto":
        rows = [
            {"prompt": f"Q{i}", "completion": f" answer {i}", "label": i % 2 == 0} for i in range(4)
        ]
    else:
        from dsft.synthetic import generate_preference_pairs

        rows = generate_preference_pairs(4, seed=8)
    pairs, _ = tokenize_pairs(tok, read_pairs([str(_write(tmp_path, rows))]), ChatOptions(), 99)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    live = None
    if kind == "sigmoid":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        live = "adapter"
    cfg = PreferenceConfig(loss_type=kind, rpo_alpha=0.5 if kind == "sigmoid" else 0.0)
    step = PreferenceStep(cfg, output_head(model), torch.device("cpu"), live)
    micro = collate_pairs(pairs, tok.pad_token_id)
    if kind == "kto":
        micro["ref"] = torch.full((8,), -1000.0)  # far below: a positive KL estimate
    n_pairs, n_tokens = step.counts([micro])
    total, sums = step.loss(model, micro, n_pairs, n_tokens)
    total.backward()
    assert math.isfinite(float(total.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    m = step_metrics(sums.tolist(), cfg, kto=kind == "kto")
    assert m["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    if kind == "kto":
        assert m["kl"] > 0
    if kind == "sigmoid":
        assert m["rewards/chosen"] == 0.0 and m["loss"] > math.log(2)  # + the NLL term


def test_config_problems_are_collected(tiny_model: Path, tmp_path: Path) -> None:
    from dsft.config import load_config
    from dsft.errors import ConfigError

    data = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                f"model.path={tiny_model}",
                f"data.path=[{data}]",
                "train.objective=dpo",
                "preference.beta=0",
                "preference.loss_type=robust",
                "preference.label_smoothing=0.6",
                "preference.reference=none",
                "train.micro_batch=auto",
                "train.global_batch=8",
                "eval.metric=val/rewards/accuracy",
            ],
        )
    text = str(e.value)
    for needle in ("preference.beta", "label_smoothing", "reference=none", "micro_batch"):
        assert needle in text
    with pytest.raises(ConfigError, match=r"needs train\.objective=dpo"):
        load_config(
            None,
            [f"model.path={tiny_model}", f"data.path=[{data}]", "eval.metric=val/rewards/accuracy"],
        )


def test_data_inspect_shows_both_sides(tiny_model: Path, tmp_path: Path, tok) -> None:
    from dsft.config import load_config
    from dsft.recipes.inspect import report
    from dsft.synthetic import generate_preference_pairs

    data = _write(tmp_path, generate_preference_pairs(20, seed=2))
    cfg = load_config(
        None,
        [f"model.path={tiny_model}", f"data.path=[{data}]", "train.objective=dpo"],
    )
    text = report(cfg, tok, examples=1)
    assert "train pair 0" in text and ") chosen:" in text and ") rejected:" in text
    assert text.count("<|assistant|>[[") == 2 and "pairs                train" in text
