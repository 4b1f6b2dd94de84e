"""One rank of the fused-loss equality check (run by torchrun from test_fused_loss.py).

For every (ZeRO stage, head variant, packed) case it builds two DeepSpeed engines from the
same weights, runs one micro-batch per rank through the full-logits loss on one and the
chunked loss (dsft/loss.py) on the other, scaled as the training loop scales it, and
compares the global loss and the full (ZeRO-gathered) gradient of every parameter.
Rank 0 writes the largest differences to OUT as JSON.

usage: fused_loss_worker.py MODEL_DIR UNTIED_DIR DATA OUT STAGES
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import yaml

from dsft import distributed, loss
from dsft.config import batch_shape, load_config
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.tokenize import Tokenized
from dsft.ds_config import deepspeed_config
from dsft.model import build_model, freeze
from dsft.optim import make_optimizer, param_groups


def examples(rank: int, world: int) -> list[Tokenized]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(8 * world):
        n = 10 + 7 * i % 17
        ids = torch.randint(7, 90, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [-100] * (n // 2) + ids[n // 2 :]))
    return out[rank::world]


def run_case(deepspeed, tmp: Path, model_dir: str, data: str, stage: int, variant: str,
             packed: bool) -> dict[str, float]:  # fmt: skip
    env = distributed.setup()
    model_tree = {"path": model_dir}
    if variant == "frozen_head":
        model_tree["freeze"] = {"patterns": ["lm_head"]}
    if variant == "lora":
        model_tree["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                              "modules_to_save": ["lm_head"]}  # fmt: skip
    tree = {
        "output_dir": str(tmp / "unused"),
        "model": model_tree,
        "data": {"path": [data]},
        "train": {"micro_batch": 4, "grad_accum": 1, "precision": "fp32", "lr": 1e-3},
        "deepspeed": {"zero_stage": stage},
    }
    cfg_path = tmp / f"c{env.rank}.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    cfg = load_config(cfg_path, [])
    ds_config = deepspeed_config(cfg, batch_shape(cfg.train, env.world_size), 32)
    exs = examples(env.rank, env.world_size)
    batch = collate_packed([exs[:3], exs[3:]], 0) if packed else collate(exs, 0)
    batch.pop("lengths")
    labels = batch.pop("labels")
    local = int((labels[:, 1:] != -100).sum())
    global_targets = distributed.all_reduce_sum([local])[0].item()
    results = {}
    for path in ("full", "fused"):
        torch.manual_seed(0)
        model = build_model(cfg.model, torch.float32, ds_config)
        if variant == "lora":  # nonzero adapters so they change the output
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        torch.nn.init.normal_(p, std=0.02)
        freeze(model, cfg.model.freeze)
        optimizer = make_optimizer(cfg, param_groups(model, cfg.train))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if path == "full":
            nll = loss.logits_nll(engine(**batch, use_cache=False).logits, labels)
        else:
            head = loss.output_head(engine.module)
            index, targets = loss.target_index(labels)
            (chunks,) = loss.lockstep_chunks([len(targets)], head.vocab, env.world_size > 1)
            chunks = max(chunks, 3)  # several chunks even for the tiny vocabulary
            nll, _ = loss.fused_nll(engine, head, batch, index, targets, chunks)
        engine.backward(nll * env.world_size / global_targets, scale_wrt_gas=False)
        grads = {}
        for n, p in engine.module.named_parameters():
            if p.requires_grad:
                g = deepspeed.utils.safe_get_full_grad(p)
                grads[n] = None if g is None else g.detach().clone()
        total = distributed.all_reduce_sum([nll.item()])[0].item()
        results[path] = (total / global_targets, grads)
        engine.destroy()
    (full_loss, full), (fused_loss, fused) = results["full"], results["fused"]
    assert full.keys() == fused.keys(), (full.keys(), fused.keys())
    worst = 0.0
    for n in full:
        assert (full[n] is None) == (fused[n] is None), n
        if full[n] is not None:
            scale = full[n].abs().max().item() + 1e-12
            worst = max(worst, (full[n] - fused[n]).abs().max().item() / scale)
    with_grad = sorted(n for n, g in full.items() if g is not None)
    return {"loss_full": full_loss, "loss_fused": fused_loss, "grad_rel_err": worst,
            "params_with_grad": len(with_grad),
            "head_grad": any("lm_head" in n for n in with_grad)}  # fmt: skip


def main() -> None:
    model_dir, untied, data, out, stages = sys.argv[1:6]
    deepspeed = distributed.import_deepspeed()
    tmp = Path(out).parent
    report = {}
    for stage in map(int, stages.split(",")):
        for variant in os.environ.get("VARIANTS", "tied,untied,frozen_head,lora").split(","):
            for packed in (False, True):
                path = model_dir if variant == "tied" else untied
                key = f"zero{stage}/{variant}/{'packed' if packed else 'padded'}"
                report[key] = run_case(deepspeed, tmp, path, data, stage, variant, packed)
    if distributed.is_main():
        Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
