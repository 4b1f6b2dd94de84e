"""The GPU kernel options against the plain path, in one fresh process (Liger patches
transformers' classes for the whole process): prints one JSON line of relative errors.

usage: python -m tests.integration.kernels_worker MODEL_DIR OPTION   (OPTION: liger)
"""

from __future__ import annotations

import json
import sys

import torch

from dsft import loss
from dsft.config import ModelConfig
from dsft.model import load_model


def loss_and_grads(model: torch.nn.Module, batch: dict, labels: torch.Tensor):
    index, targets = loss.target_index(labels)
    dev = next(model.parameters()).device
    nll, _ = loss.fused_nll(model, loss.output_head(model), batch, index.to(dev),
                            targets.to(dev), 2)  # fmt: skip
    nll.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return nll.item(), grads


def main() -> None:
    model_dir, option = sys.argv[1:3]
    from tests.integration.test_gpu_kernels import packed_batch

    batch, labels = packed_batch("cuda")
    results = {}
    for kernels in ("none", option):
        cfg = ModelConfig(path=model_dir, kernels=kernels)
        model = load_model(cfg, torch.float32).cuda()
        results[kernels] = loss_and_grads(model, batch, labels)
        del model
    (ref, ref_g), (got, got_g) = results["none"], results[option]
    err = max((got_g[n] - ref_g[n]).norm().item() / (ref_g[n].norm().item() + 1e-12)
              for n in ref_g)  # fmt: skip
    print(json.dumps({"loss_plain": ref, "loss_option": got, "grad_rel_err": err,
                      "params": len(ref_g), "same_params": ref_g.keys() == got_g.keys()}))  # fmt: skip


if __name__ == "__main__":
    main()
