"""The tiled MLP (dsft/tiled_mlp.py): the same loss and gradients as the plain MLP, the plain
path in evaluation, and the tile count. Under ZeRO-3 and sequence parallelism:
tests/integration/test_sequence_parallel_runs.py."""

from __future__ import annotations

import copy

import torch

from dsft import tiled_mlp

from .test_sequence_parallel import _llama


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiled_mlp_gives_the_same_loss_and_gradients() -> None:
    model = _llama()
    tiled = copy.deepcopy(model)
    assert tiled_mlp.tile_mlp(tiled, 3) == 2  # both blocks
    ids = torch.randint(0, 50, (2, 40))
    loss, grads = _loss_and_grads(model, ids)
    tloss, tgrads = _loss_and_grads(tiled, ids)
    torch.testing.assert_close(tloss, loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(tgrads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    tiled.eval()  # evaluation and generation take the plain path
    with torch.no_grad():
        torch.testing.assert_close(tiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tiled_mlp.tiles_for(131072, 8, 4096) == 4 and tiled_mlp.tiles_for(48, 1, 128) == 1
