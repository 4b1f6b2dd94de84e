"""dsft.profiling: the kernel table from a real CPU profiler trace of a tiny model's training
steps, and from a hand-made GPU trace (kernels linked to the operators that launched them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsft import profiling
from dsft.profiling import IDLE, category, kernel_table


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("aten::mm", "GEMM"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "GEMM"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT", "GEMM"),
        ("aten::_scaled_dot_product_flash_attention", "attention"),
        ("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
        ("aten::nll_loss_forward", "loss"),
        ("aten::_log_softmax", "loss"),
        ("multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
        ("Memcpy DtoD (Device -> Device)", "memory"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>", "other"),
    ],
)
def test_kernel_names_are_categorised(name: str, want: str) -> None:
    assert category(name) == want


def _cpu_trace(tmp_path: Path) -> Path:
    """3 profiled AdamW steps of a tiny Llama on packed-like rows (sdpa, cross-entropy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 96, (2, 64))
    sched = torch.profiler.schedule(wait=0, warmup=1, active=3, repeat=1)
    path = tmp_path / "trace.json"
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=sched,
        on_trace_ready=lambda p: p.export_chrome_trace(str(path)),
    ) as prof:
        for _ in range(4):
            logits = model(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96),
                                                     ids[:, 1:].reshape(-1))  # fmt: skip
            loss.backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return path


def test_kernel_table_of_a_cpu_trace(tmp_path: Path) -> None:
    table = kernel_table(profiling.load_trace(_cpu_trace(tmp_path)))
    assert table.device == "cpu" and table.steps == 3 and table.step_ms > 0
    shares = table.categories
    for cat in ("attention", "GEMM", "loss", "optimizer"):
        assert shares[cat] > 0, (cat, shares)
    assert 0 <= shares[IDLE] < 1
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)  # the step, all accounted
    assert table.top and all(r.share <= 1 for r in table.top)
    assert {r.category for r in table.top if r.name == "aten::mm"} <= {"GEMM"}
    md = table.markdown("tiny")
    assert md.startswith("# Top kernels: tiny") and "| idle / host gaps |" in md


def _x(name, ts, dur, cat="cpu_op", tid=1, **args):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid,
            "args": args}  # fmt: skip


def test_kernel_table_of_a_gpu_trace(tmp_path: Path) -> None:
    """Kernels take the category of their name, else of the operator (and its callers) that
    launched them; idle is the step time no kernel covers."""
    events = [
        _x("ProfilerStep#2", 0, 1000, cat="user_annotation"),
        _x("ProfilerStep#2", 0, 1000, cat="gpu_user_annotation", tid=7),
        _x("aten::linear", 10, 100, **{"External id": 1}),
        _x("aten::t", 15, 5, **{"External id": 9}),
        _x("aten::something_new", 20, 80, **{"External id": 2}),
        _x("Optimizer.step#AdamW.step", 500, 300, cat="user_annotation"),
        _x("aten::mul_", 510, 20, **{"External id": 3}),
        _x("nvjet_tst_xyz", 100, 300, cat="kernel", tid=7, **{"External id": 2}),
        _x("flash_fwd_kernel", 400, 200, cat="kernel", tid=7, **{"External id": 5}),
        _x("vectorized_elementwise_kernel", 600, 50, cat="kernel", tid=7, **{"External id": 3}),
        _x("Memcpy HtoD", 650, 50, cat="gpu_memcpy", tid=7),
        _x("ncclDevKernel_AllReduce", 800, 100, cat="kernel", tid=7),
        _x("late_kernel", 1500, 100, cat="kernel", tid=7),  # after the profiled step
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    table = profiling.write(path, tmp_path / "out", "hand-made")
    c = table.categories
    assert table.device == "cuda" and table.steps == 1 and table.step_ms == pytest.approx(1.0)
    assert c["GEMM"] == pytest.approx(0.3)  # unknown kernel name, launched under aten::linear
    assert c["attention"] == pytest.approx(0.2)
    assert c["optimizer"] == pytest.approx(0.05)  # elementwise, under Optimizer.step
    assert c["memory"] == pytest.approx(0.05) and c["communication"] == pytest.approx(0.1)
    assert c[IDLE] == pytest.approx(0.3)  # 0-100, 700-800, 900-1000
    assert table.top[0].name == "nvjet_tst_xyz"
    saved = json.loads((tmp_path / "out" / "kernels.json").read_text())
    assert saved["categories"]["GEMM"] == pytest.approx(0.3)
    assert "| `flash_fwd_kernel` | attention |" in (tmp_path / "out" / "kernels.md").read_text()


def test_a_trace_without_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="ProfilerStep"):
        kernel_table({"traceEvents": [_x("aten::mm", 0, 1)]})


def test_step_profiler_writes_the_kernel_table(tmp_path: Path) -> None:
    """logging.profile_steps: top_kernels.md opens with the kernel table; kernels.json and
    the gzipped Chrome trace sit beside it."""
    from dsft.monitor import StepProfiler

    prof = StepProfiler(tmp_path, 2)
    w = torch.randn(64, 64, requires_grad=True)
    for _ in range(5):
        torch.nn.functional.cross_entropy(torch.randn(8, 64) @ w, torch.zeros(8).long()).backward()
        prof.step()
    prof.close()
    folder = tmp_path / "profile"
    assert (folder / "top_kernels.md").read_text().startswith("# Top kernels: 2 profiled")
    assert json.loads((folder / "kernels.json").read_text())["steps"] == 2
    assert (folder / "trace.json.gz").is_file() and not (folder / "trace.json").exists()
