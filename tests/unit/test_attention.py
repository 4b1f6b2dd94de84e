"""dsft.attention: the varlen path on packed rows equals sdpa with the block-diagonal mask
(forward and every gradient; the CPU reference kernel here, the CUDA kernels in
tests/integration/test_gpu_kernels.py), the torch-signature glue, and the resolver."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsft import attention
from dsft.attention import Support, resolve
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.tokenize import Tokenized
from dsft.errors import ConfigError


def _examples(n: int = 6) -> list[Tokenized]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        k = 5 + 7 * i % 13
        ids = torch.randint(5, 60, (k,), generator=g).tolist()
        out.append(Tokenized(ids, [-100] * (k // 3) + ids[k // 3 :]))
    return out


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 4 query / 2 key-value heads (GQA)."""
    from dsft.synthetic import build_model_dir

    return build_model_dir(
        tmp_path_factory.mktemp("attn") / "m", hidden=32, layers=2, num_key_value_heads=2
    )


def _load(path: Path, impl: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attention.hf_name(impl, str(path))
    )


def _run(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    batch = dict(batch)
    batch.pop("lengths")
    labels = batch.pop("labels")
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits
    keep = labels[:, 1:] != -100
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _max_diff(a, b) -> tuple[float, float]:
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and ga
    return (la - lb).abs().max().item(), max((ga[n] - gb[n]).abs().max().item() for n in ga)


def test_segments_from_host_lengths_equal_those_from_positions() -> None:
    exs = _examples()
    b = collate_packed([exs[:2], exs[2:5], exs[5:]], 0, cu_seqlens=True)
    cu = b[attention.SEGMENTS_KEY]
    assert cu.dtype == torch.int32
    assert cu.tolist() == attention.cu_seqlens_from_positions(b["position_ids"]).tolist()
    width = b["input_ids"].shape[1]
    assert cu[-1] == 3 * width and len(cu) - 1 == len(exs) + 2  # two rows have a pad tail
    assert attention.SEGMENTS_KEY not in collate_packed([exs[:2]], 0)  # only when asked


@pytest.mark.parametrize("host_segments", [True, False], ids=["cu_seqlens", "positions"])
def test_varlen_on_packed_rows_equals_sdpa_block_mask(gqa_model: Path, host_segments) -> None:
    """The varlen path (segments from the batch's cu_seqlens, or found from the positions)
    gives sdpa's logits and gradients on the same packed batch, where sdpa gets the 4-D
    block-diagonal mask that transformers builds from the restarting positions."""
    exs = _examples()
    rows = [exs[:3], exs[3:]]
    sdpa = _run(_load(gqa_model, "sdpa"), collate_packed(rows, 0))
    varlen = _run(_load(gqa_model, "varlen"), collate_packed(rows, 0, cu_seqlens=host_segments))
    fwd, grad = _max_diff(varlen, sdpa)
    print(f"varlen vs sdpa (fp32, CPU reference): max |dlogits| {fwd:.2e}, max |dgrad| {grad:.2e}")
    assert fwd < 1e-5 and grad < 1e-5
    # and the comparison can fail: one segment per row lets examples see each other
    wrong = collate_packed(rows, 0)
    width = wrong["input_ids"].shape[1]
    wrong[attention.SEGMENTS_KEY] = torch.tensor([0, width, 2 * width], dtype=torch.int32)
    fwd_bad, _ = _max_diff(_run(_load(gqa_model, "varlen"), wrong), sdpa)
    assert fwd_bad > 1e-3


def test_varlen_on_padded_rows_and_generation_takes_sdpa(gqa_model: Path) -> None:
    """Padded rows (a 2-D attention mask) and decoding with a cache run sdpa under the
    varlen name: the same numbers and the same generated tokens."""
    exs = _examples()
    sdpa, varlen = _load(gqa_model, "sdpa"), _load(gqa_model, "varlen")
    fwd, grad = _max_diff(_run(varlen, collate(exs, 0)), _run(sdpa, collate(exs, 0)))
    assert fwd < 1e-5 and grad < 1e-5
    prompt = torch.tensor([exs[1].input_ids[:5], exs[2].input_ids[:5]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen.generate(prompt, **kw), sdpa.generate(prompt, **kw))


def test_torch_varlen_glue_across_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The call into torch's varlen_attn for both of its signatures (2.10: is_causal;
    2.11+: window_size, scale, enable_gqa), checked against the reference kernel."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, h, 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    ref = attention.reference_varlen(q, k, v, cu, 4, 0.3)
    seen = []

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), scale=None,
            enable_gqa=False, return_aux=None):  # fmt: skip
        assert window_size == (-1, 0) and (enable_gqa or q.shape[1] == k.shape[1])
        seen.append("new")
        return attention.reference_varlen(q, k, v, cu_q, max_q, scale)

    def old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and q.shape[1] == k.shape[1]  # no GQA: heads repeated for it
        seen.append("old")
        return attention.reference_varlen(q, k, v, cu_q, max_q, q.shape[-1] ** -0.5)

    for fn in (new, old):
        import inspect

        found = (fn, frozenset(inspect.signature(fn).parameters))
        monkeypatch.setattr(attention, "_torch_varlen", lambda found=found: found)
        torch.testing.assert_close(attention.torch_varlen(q, k, v, cu, 4, 0.3), ref)
    assert seen == ["new", "old"]


LLAMA = Support("LlamaForCausalLM", sdpa=True, flex=True, flash=True)
GPT_OSS = Support("GptOssForCausalLM", sdpa=False, flex=True, flash=True, no_varlen="sinks")


@pytest.mark.parametrize(
    ("support", "cuda", "packed", "sp", "want"),
    [
        (LLAMA, True, True, 1, "varlen"),
        (LLAMA, True, False, 1, "sdpa"),
        (LLAMA, False, True, 1, "sdpa"),
        (LLAMA, True, True, 2, "sdpa"),
        (GPT_OSS, False, True, 1, "eager"),
        (GPT_OSS, True, True, 1, "flex_attention"),
        (GPT_OSS, True, True, 2, "eager"),
        (Support("X", sdpa=False), True, False, 1, "eager"),
    ],
)
def test_auto_resolves_by_family_hardware_and_rows(support, cuda, packed, sp, want) -> None:
    assert resolve("auto", support, cuda=cuda, packed=packed, sequence_parallel=sp) == want


def test_auto_keeps_sdpa_for_fp32_on_cuda() -> None:  # no flash kernel for fp32
    assert resolve("auto", LLAMA, cuda=True, packed=True, half=False) == "sdpa"


def test_explicit_choice_a_family_lacks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="GptOssForCausalLM does not support it") as e:
        resolve("sdpa", GPT_OSS, cuda=False, packed=True)
    assert "eager" in str(e.value) and "sdpa," not in str(e.value)
    with pytest.raises(ConfigError, match=r"varlen.*\(sinks\)"):
        resolve("varlen", GPT_OSS, cuda=True, packed=True)
    assert resolve("eager", GPT_OSS, cuda=False, packed=True) == "eager"
    assert resolve("varlen", LLAMA, cuda=False, packed=False) == "varlen"


def test_family_support_is_read_from_the_class() -> None:
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    llama = attention.support_of(LlamaForCausalLM, LlamaConfig())
    assert llama.sdpa and llama.no_varlen is None
    oss = attention.support_of(GptOssForCausalLM, GptOssConfig())
    assert not oss.sdpa and oss.flex and oss.no_varlen == "attention sinks"
    mistral = attention.support_of(MistralForCausalLM, MistralConfig(sliding_window=64))
    assert mistral.no_varlen == "sliding-window layers"
    assert (
        attention.support_of(MistralForCausalLM, MistralConfig(sliding_window=None)).no_varlen
        is None
    )


def test_the_training_step_batches_carry_segments_only_for_varlen() -> None:
    """dsft.step.with_segments: the objective's packed batches get the rows' cu_seqlens
    (the same as collate_packed counts) for varlen, and nothing changes otherwise."""
    from dsft.step import SFT, with_segments

    exs = _examples()
    rows = [exs[:2], exs[2:]]

    def batch(*_args):
        return collate_packed(rows, 0)

    obj = type(SFT)("t", SFT.prepare, batch, SFT.step)
    assert with_segments(obj, "sdpa") is obj
    got = with_segments(obj, "varlen").batch(None, None, None, 0)[attention.SEGMENTS_KEY]
    assert got.tolist() == collate_packed(rows, 0, cu_seqlens=True)[attention.SEGMENTS_KEY].tolist()
