"""Mixture of experts: the router loss equals transformers' own, LoRA targets, active params."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from dsft import loss, moe
from dsft.config import LoraConfig
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.tokenize import IGNORE_INDEX, Tokenized
from dsft.sequence_parallel import shift_labels
from dsft.synthetic import build_moe_model_dir

EQUIVALENCE = ["qwen3_moe", "mixtral", "gpt_oss"]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    # a large coefficient, so a wrong router term would show in the loss and gradients
    return {
        f: build_moe_model_dir(root / f, f, router_aux_loss_coef=0.5)
        for f in [*EQUIVALENCE, "deepseek_v3"]
    }


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    attn = "eager" if "gpt_oss" in path.name else "sdpa"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)


def _examples(n: int = 4) -> list[Tokenized]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 7 + 3 * i
        ids = torch.randint(3, 60, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]
        out.append(Tokenized(ids, labels))
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", EQUIVALENCE)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_router_loss_equals_transformers(moe_dirs, family: str, fused: bool) -> None:
    """dsft's objective of one micro-batch (token-mean NLL + coef x router loss) and every
    gradient equal transformers' ``model(..., labels, output_router_logits=True).loss``."""
    model = _model(moe_dirs[family])
    batch = collate(_examples(), pad_id=0)
    batch.pop("lengths")
    labels = batch.pop("labels")

    model.zero_grad()
    ref = model(**batch, labels=labels, output_router_logits=True)
    ref.loss.backward()
    ref_grads = _grads(model)
    assert ref.aux_loss is not None and float(ref.aux_loss.detach()) > 0

    model.zero_grad()
    router = moe.router_loss(model)
    assert router is not None and router.coef == 0.5
    head = loss.output_head(model) if fused else None
    targets = shift_labels(labels)
    count = int((targets != IGNORE_INDEX).sum())
    logits: list = []
    nll = loss.micro_nll(model, head, batch, targets, logits)
    aux = router(logits, batch["attention_mask"])
    total = nll / count + aux * moe.aux_weight(router.coef, 1, 1)
    total.backward()
    grads = _grads(model)

    diff = abs(float(total) - float(ref.loss))
    gdiff = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
    print(
        f"{family} {'fused' if fused else 'plain'}: loss diff {diff:.2e}, max grad diff {gdiff:.2e}"
    )
    torch.testing.assert_close(total, ref.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(aux, ref.aux_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    router_grads = [n for n in ref_grads if ".gate." in n or ".router." in n]
    assert router_grads and all(grads[n].abs().sum() > 0 for n in router_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5, msg=name)


def test_packed_rows_exclude_padding(moe_dirs) -> None:
    """Packed rows carry no attention mask: their real-token mask keeps padding out of the
    router statistics, so the same examples give the same router loss packed or padded."""
    model = _model(moe_dirs["qwen3_moe"]).eval()
    router = moe.router_loss(model)
    exs = _examples()
    padded = collate(exs, 0)
    packed = collate_packed([[exs[0], exs[3]], [exs[1]], [exs[2]]], 0, token_mask=True)
    values = []
    with torch.no_grad():
        for batch, mask in ((padded, padded["attention_mask"]), (packed, packed["token_mask"])):
            inputs = {
                k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch
            }
            logits = model(**inputs, use_cache=False, output_router_logits=True).router_logits
            values.append(router(logits, mask))
        unmasked = router(logits, None)  # and padding would change it
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-6)
    assert abs(float(unmasked) - float(values[0])) > 1e-4


def test_router_loss_coefficient(moe_dirs) -> None:
    model = _model(moe_dirs["mixtral"])
    assert moe.router_loss(model, 0.0) is None  # train.router_aux_loss_coef=0: off
    assert moe.router_loss(model, 0.02).coef == 0.02
    # DeepSeek-V3 balances by a router bias: transformers adds no auxiliary loss
    assert moe.router_loss(_model(moe_dirs["deepseek_v3"])) is None
    # dense models have none
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
        )
    )
    assert moe.router_loss(dense) is None


def test_aux_weight_averages_micro_batches() -> None:
    # DeepSpeed divides the ranks' summed gradients by the divisor: coef x mean over the
    # grad_accum x data-parallel micro-batches of the step
    assert moe.aux_weight(0.01, 4, 2 * 4) == pytest.approx(0.01 / 2)


def _adapted(model) -> set[str]:
    """Adapted module paths below the layers (``1.mlp.experts``), from LoRA parameter names."""
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora_" in n:
            names.add(n.split(".lora_")[0].split(".layers.")[1].replace(".base_layer", ""))
    return names


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_lora_on_experts(moe_dirs, family: str, tmp_path: Path) -> None:
    """all-linear: attention, routers, shared experts and dense MLPs get adapters, and the
    fused experts with model.lora.experts; default dropout is no error (it goes on the linear
    adapters); the merged model and the reloaded adapter give the adapter model's logits."""
    from peft import PeftModel

    from dsft.config import LoraConfig
    from dsft.model import apply_lora

    model = apply_lora(_model(moe_dirs[family]), LoraConfig(enabled=True, r=4))
    adapted = _adapted(model)
    # lean checkpoints keep the trainable tensors only: the adapters, no base expert weight
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    router = "gate" if family == "deepseek_v3" else "router"
    assert {"1.self_attn.o_proj", f"1.mlp.{router}", "1.mlp.experts"} <= adapted
    if family == "deepseek_v3":  # real nn.Linear layers named like v4 experts keep theirs
        assert {"1.mlp.shared_experts.gate_proj", "0.mlp.down_proj"} <= adapted
    drops = {
        type(m.lora_dropout["default"]).__name__
        for m in model.modules()
        if hasattr(m, "lora_dropout")
    }
    assert drops == {"Dropout", "Identity"}  # linear adapters / parameter adapters
    no_experts = apply_lora(_model(moe_dirs[family]), LoraConfig(enabled=True, r=4, experts=False))
    assert "1.mlp.experts" not in _adapted(no_experts) and f"1.mlp.{router}" in _adapted(no_experts)

    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    x = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        model.save_pretrained(tmp_path / "adapter")
        with moe.peft_as_configured():
            again = PeftModel.from_pretrained(_model(moe_dirs[family]), tmp_path / "adapter")
        torch.testing.assert_close(again.eval()(input_ids=x).logits, ref, rtol=0, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=0, atol=1e-5)


def test_lora_dora_on_experts_is_a_config_error(moe_dirs) -> None:
    from dsft.config import LoraConfig
    from dsft.errors import ConfigError
    from dsft.model import apply_lora

    with pytest.raises(ConfigError, match=r"model\.lora\.use_dora"):
        apply_lora(_model(moe_dirs["mixtral"]), LoraConfig(enabled=True, use_dora=True))


def test_active_parameters_of_the_built_in_shapes() -> None:
    """Memory counts every parameter, FLOPs the ones a token uses: the model cards' numbers."""
    from dsft import planner

    qwen = planner.model_facts("qwen3-30b-a3b")
    assert round(qwen.total_params / 1e9, 1) == 30.5
    assert round(qwen.active_params / 1e9, 1) in (3.3, 3.4)  # card: 3.3B (3.35B)
    oss = planner.model_facts("gpt-oss-20b")
    assert round(oss.total_params / 1e9) == 21  # card: 21B (20.91B)
    # OpenAI's 3.6B leaves the input embedding (a lookup) out; dsft counts it, as for dense
    # models (the unembedding is a matmul either way)
    embedding = oss.vocab * oss.hidden
    assert round((oss.active_params - embedding) / 1e9, 1) == 3.6
    # the time estimate follows the active parameters, memory the total
    dense = planner.model_facts("llama-7b")
    assert dense.active == (dense.total_params, dense.trainable_params)
    ratio = planner.flops_per_token(qwen, 1) / planner.flops_per_token(
        dataclasses.replace(qwen, active_params=0, active_trainable=0), 1
    )
    assert ratio == pytest.approx(qwen.active_params / qwen.total_params, rel=1e-3)
    hw = planner.Hardware(gpus_per_node=8, gpu_mem=80 * 2**30, nodes=1, host_mem=2**40)
    w = planner.Workload(seq=1024, global_batch=64)
    for shape in (qwen, oss):
        assert planner.model_facts(shape.name, LoraConfig(enabled=True)).active_params
        assert planner.estimate(shape, hw, w, planner.Option(3)).states > 0


def test_dsft_plan_shows_active_parameters(capsys) -> None:
    from dsft.cli import main

    hw = ["--gpus", "8", "--gpu-mem", "80GB", "--host-mem", "1TB", "--tokens", "100M"]
    assert main(["plan", "--shape", "qwen3-30b-a3b", *hw]) == 0
    out = capsys.readouterr().out
    assert "30.53B params (3.35B active)" in out and "11 min" in out
    assert main(["plan", "--family", *hw]) == 0
    out = capsys.readouterr().out
    assert re.search(r"  qwen3-30b-a3b +30\.53B +3\.35B +30\.53B ", out)
    assert re.search(r"  gpt-oss-20b +20\.91B +4\.19B ", out)


def test_idle_experts_of_a_real_model(moe_dirs) -> None:
    model = _model(moe_dirs["mixtral"])
    idle, idle_trainable = moe.idle_params(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert idle == idle_trainable == experts // 2  # top-2 of 4


def test_mxfp4_experts_load_dequantised(tmp_path: Path) -> None:
    """GPT-OSS's published MXFP4 experts (blocks + scales) load as bf16 weights equal to
    transformers' own dequantisation, and the quantisation config is gone (plain exports)."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from dsft.config import ModelConfig
    from dsft.model import load_model

    d = build_moe_model_dir(tmp_path / "mxfp4", "gpt_oss")
    sd = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    packed = {}
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, rows_in, cols_out = sd.pop(k).shape  # stored [E, out, in / 32, 16] + scales
        blocks = torch.randint(0, 256, (experts, cols_out, rows_in // 32, 16), generator=g)
        scales = torch.randint(120, 130, (experts, cols_out, rows_in // 32), generator=g)
        packed[k] = (blocks.to(torch.uint8), scales.to(torch.uint8))
        sd[f"{k}_blocks"], sd[f"{k}_scales"] = packed[k]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (d / "config.json").write_text(json.dumps(config))

    assert moe.dequantize_kwargs(d)["quantization_config"].dequantize
    model = load_model(ModelConfig(path=str(d), attn_implementation="eager"), torch.bfloat16)
    params = dict(model.named_parameters())
    for k, (blocks, scales) in packed.items():
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        assert params[k].dtype == torch.bfloat16 and torch.equal(params[k].data, want)
    assert getattr(model.config, "quantization_config", None) is None
    assert moe.dequantize_kwargs(build_moe_model_dir(tmp_path / "m", "mixtral")) == {}


def test_zero3_leaves_only_for_separate_expert_modules(moe_dirs) -> None:
    """Fused experts are one module (every rank runs it): nothing to declare. A block with an
    nn.ModuleList of experts becomes a ZeRO-3 leaf, gathered whole on every rank."""
    for family in ("qwen3_moe", "deepseek_v3"):
        assert moe.z3_leaf_classes(_model(moe_dirs[family])) == []

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    model = torch.nn.Sequential(Block(), Block())
    assert moe.declare_z3_leaves(model) == [Block]
    assert all(getattr(b, "_z3_leaf", False) for b in model)
