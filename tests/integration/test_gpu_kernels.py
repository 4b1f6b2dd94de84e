"""CUDA: the fused loss, the varlen and FlexAttention paths on packed rows, torch.compile
(whole and regional) and Liger kernels, each against the plain path (loss and every
gradient). Skipped without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsft import loss
from dsft.config import ModelConfig
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.tokenize import Tokenized
from dsft.model import load_model

from ..conftest import ROOT, gpu_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _examples() -> list[Tokenized]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(8):
        n = 12 + 9 * i % 23
        ids = torch.randint(7, 90, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [-100] * (n // 3) + ids[n // 3 :]))
    return out


def packed_batch(
    dev: str, packed: bool = True, segments: bool = False
) -> tuple[dict, torch.Tensor]:
    """Two packed rows of four examples each (or the eight padded), on ``dev``; ``segments``:
    with the rows' cu_seqlens (the varlen path's)."""
    exs = _examples()
    b = collate_packed([exs[:4], exs[4:]], 0, cu_seqlens=segments) if packed else collate(exs, 0)
    b.pop("lengths")
    labels = b.pop("labels")
    return {k: v.to(dev) for k, v in b.items()}, labels


def _run(model: torch.nn.Module, batch: dict, labels: torch.Tensor, fused: bool = True):
    if fused:
        index, targets = loss.target_index(labels)
        nll, _ = loss.fused_nll(model, loss.output_head(model), batch, index.cuda(),
                                targets.cuda(), 3)  # fmt: skip
    else:
        nll = loss.logits_nll(model(**batch, use_cache=False).logits, labels.cuda())
    nll.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return nll.item(), grads


def _close(a, b, rtol: float) -> None:
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        err = (ga[n] - gb[n]).norm().item() / (gb[n].norm().item() + 1e-12)
        assert err < rtol * 10, (n, err)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 wide, 4 heads: head_dim 16, the smallest FlexAttention's Triton kernels take."""
    from dsft.synthetic import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("gpu-model") / "m", hidden=64, layers=2)


def _model(tiny_model: Path, dtype=torch.float32, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(ModelConfig(path=str(tiny_model), **kw), dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_equals_full_logits_on_cuda(dtype, tiny_model: Path) -> None:
    model = _model(tiny_model, dtype)
    batch, labels = packed_batch("cuda")
    full = _run(model, batch, labels, fused=False)
    fused = _run(model, batch, labels, fused=True)
    _close(fused, full, 1e-5 if dtype == torch.float32 else 2e-2)


def test_flex_attention_on_packed_rows_equals_sdpa(tiny_model: Path) -> None:
    """Packed rows (restarting position_ids) under FlexAttention give the loss and gradients
    of the same examples padded under SDPA: attention never crosses examples."""
    padded = _run(_model(tiny_model), *packed_batch("cuda", packed=False))
    sdpa = _run(_model(tiny_model), *packed_batch("cuda"))
    flex = _run(_model(tiny_model, attn_implementation="flex_attention"), *packed_batch("cuda"))
    _close(sdpa, padded, 1e-4)
    _close(flex, sdpa, 1e-4)


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 wide, 4 query / 2 key-value heads (GQA), head_dim 16."""
    from dsft.synthetic import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("gqa") / "m", hidden=64, layers=2,
                           num_key_value_heads=2)  # fmt: skip


def test_varlen_kernel_equals_reference_on_cuda() -> None:
    """The CUDA varlen kernel (torch's varlen_attn, else flash-attn) against the per-segment
    sdpa reference, bf16, GQA, a non-default scale: outputs and q/k/v gradients."""
    from dsft import attention

    if attention.kernel_name("cuda").startswith("reference"):
        pytest.skip("no CUDA varlen kernel in this torch (and no flash-attn)")
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 100, 101, 230, 256], dtype=torch.int32, device="cuda")
    qkv = [torch.randn(256, h, 64, device="cuda", generator=g, dtype=torch.bfloat16)
           for h in (8, 2, 2)]  # fmt: skip
    outs = []
    for kernel in (attention._kernel(qkv[0]), attention.reference_varlen):
        leaves = [t.clone().requires_grad_() for t in qkv]
        out = kernel(*leaves, cu, 256, 0.1)
        out.float().square().sum().backward()
        outs.append([out.float(), *(t.grad.float() for t in leaves)])
    diffs = [(a - b).abs().max().item() for a, b in zip(*outs, strict=True)]
    print(f"varlen kernel vs reference (bf16): max |d out|, |d dq|, |d dk|, |d dv| = {diffs}")
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("segments", [True, False], ids=["cu_seqlens", "positions"])
def test_varlen_on_packed_rows_equals_sdpa(gqa_model: Path, segments: bool) -> None:
    """model.attn_implementation=varlen on packed rows (no 4-D mask) gives the loss and
    gradients of sdpa with the block-diagonal mask, bf16 tolerance."""
    sdpa = _run(_model(gqa_model, torch.bfloat16, attn_implementation="sdpa"),
                *packed_batch("cuda"))  # fmt: skip
    varlen = _run(_model(gqa_model, torch.bfloat16, attn_implementation="varlen"),
                  *packed_batch("cuda", segments=segments))  # fmt: skip
    _close(varlen, sdpa, 2e-2)


def test_regional_compile_equals_eager(tiny_model: Path) -> None:
    from dsft.fastpath import compile_model

    eager = _run(_model(tiny_model), *packed_batch("cuda"))
    model = _model(tiny_model)
    assert compile_model(None, model, "regional") == 2
    _close(_run(model, *packed_batch("cuda")), eager, 1e-4)


def test_torch_compile_equals_eager(tiny_model: Path) -> None:
    eager = _run(_model(tiny_model), *packed_batch("cuda"))
    model = _model(tiny_model)
    model.compile()
    _close(_run(model, *packed_batch("cuda")), eager, 1e-4)


def test_liger_kernels_equal_plain(tiny_model: Path) -> None:
    pytest.importorskip("liger_kernel")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.kernels_worker", str(tiny_model), "liger"],
        env=gpu_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["same_params"] and r["params"] > 0, r
    assert r["loss_option"] == pytest.approx(r["loss_plain"], rel=1e-4), r
    assert r["grad_rel_err"] < 1e-3, r
