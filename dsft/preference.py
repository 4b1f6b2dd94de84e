"""Preference tuning: the DPO family's losses, sequence log-probs, references and metrics.

The objective ``train.objective=dpo`` runs in the same training loop as SFT; this module
supplies what differs: the batch (both sides of every pair; dsft.data.pairs), the
micro-batch step (forward, per-sequence log-probs, the loss, backward) and the metrics.

Losses (``preference.loss_type``), per pair, with policy log-probs ``pc``/``pr`` and
reference log-probs ``rc``/``rr`` summed over the response tokens (``nc``/``nr`` of them),
``d = (pc - rc) - (pr - rr)``, as TRL 1.16 computes them:

  sigmoid  -(1-ε)·logσ(βd) - ε·logσ(-βd)           (DPO; ε = label_smoothing: cDPO)
  robust   (-(1-ε)·logσ(βd) + ε·logσ(-βd)) / (1-2ε)  (noise-robust DPO)
  hinge    relu(1 - βd)                             (SLiC)
  ipo      ((pc-rc)/nc - (pr-rr)/nr - 1/(2β))²      (IPO, per-token averaged as TRL)
  simpo    -(1-ε)·logσ(β(pc/nc - pr/nr) - γ) - ε·logσ(-(...))     (no reference)
  orpo     -λ·logσ(log odds(pc/nc) - log odds(pr/nr)) + NLL(chosen)  (no reference)
  kto      1-σ(β(pc-rc - z)) for desirable, 1-σ(β(z - (pr-rr))) for undesirable rows,
           z = max(0, mean KL estimate over mismatched prompt/completion pairs), detached.

Rewards are ``β·(policy - reference)`` (simpo/orpo: ``β·mean log-prob``). The step's loss is
the sum of the pair losses over the global batch divided by the global number of pairs
(so ranks and accumulation do not change it, as for SFT's token loss); ``rpo_alpha`` (and
ORPO) add ``α·`` the chosen responses' token NLL over the global chosen-token count.

Metrics are sums over pairs (loss, rewards, accuracy, margin, log-probs), all-reduced
once per step with the loss: identical on any number of ranks and through accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dsft import distributed
from dsft.config import PreferenceConfig, needs_reference
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.pairs import Pair
from dsft.data.tokenize import IGNORE_INDEX
from dsft.loss import Head, chunked_logps, final_hidden, head_linear
from dsft.optim import guard_zero0_fp32_step
from dsft.step import Objective, StepResult, Window

log = logging.getLogger("dsft")

# The per-step sums every rank adds up (one all-reduce), in this order.
SUMS = (
    "loss",  # pair losses (the preference term)
    "nll",  # chosen-token NLL (rpo_alpha / orpo)
    "pairs",
    "chosen_tokens",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
    "kl",  # KTO: the KL estimate (summed per micro-batch)
    "kl_batches",
)


# --------------------------------------------------------------------------- batches


def collate_pairs(
    pairs: Sequence[Pair],
    pad_id: int,
    rows: Sequence[Sequence[int]] | None = None,
    partners: Sequence[Pair] | None = None,
) -> dict[str, Any]:
    """One micro-batch of pairs.

    Unpacked (``rows`` None): the chosen sides, then the rejected ones, each a padded row
    (TRL's order). Packed: each row holds whole pairs (``rows[i]``: indices into ``pairs``),
    chosen then rejected side by side, positions restarting per sequence (attention never
    crosses them: dsft.data.packing). ``seq``: per label position, the index of the sequence
    it scores (chosen of pair j: j; rejected: P + j), -1 for unscored ones. KTO rows (no
    rejected side) are one sequence each, plus a mismatched copy for the KL estimate (row
    j's prompt with ``partners[j]``'s completion, by default row j+1's: P + j).
    """
    n = len(pairs)
    kto = pairs[0].rejected is None
    if kto:
        partners = partners or [pairs[(j + 1) % n] for j in range(n)]
        sides = [p.chosen for p in pairs] + [
            _mismatch(p.chosen, q.chosen) for p, q in zip(pairs, partners, strict=True)
        ]
    else:
        sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # type: ignore[misc]
    if rows is None:
        batch = collate(sides, pad_id)
        seq = torch.arange(len(sides))[:, None].expand_as(batch["labels"]).clone()
    else:
        packed_rows = [[s for j in r for s in (j, n + j)] for r in rows]
        batch = collate_packed([[sides[s] for s in row] for row in packed_rows], pad_id)
        seq = torch.full_like(batch["labels"], -1)
        for r, row in enumerate(packed_rows):
            at = 0
            for s in row:
                k = len(sides[s].input_ids)
                seq[r, at : at + k] = s
                at += k
    seq[batch["labels"] == IGNORE_INDEX] = -1
    batch["seq"] = seq
    batch["n_seq"] = len(sides)
    batch["pairs"] = n
    if kto:
        batch["desirable"] = torch.tensor([bool(p.label) for p in pairs])
    return batch


def _mismatch(prompt_of: Any, completion_of: Any) -> Any:
    """KTO's KL sequence: the prompt of one example with the completion of another."""
    from dsft.data.tokenize import Tokenized

    def split(t: Tokenized) -> int:
        return next((i for i, x in enumerate(t.labels) if x != IGNORE_INDEX), len(t.labels))

    a, b = split(prompt_of), split(completion_of)
    ids = prompt_of.input_ids[:a] + completion_of.input_ids[b:]
    labels = [IGNORE_INDEX] * a + completion_of.labels[b:]
    return Tokenized(ids, labels)


def pair_rows(units: Sequence[Sequence[int]], batch: Sequence[int]) -> list[list[int]]:
    """The packed rows of a micro-batch as indices into its own pair list."""
    out, k = [], 0
    for u in batch:
        out.append(list(range(k, k + len(units[u]))))
        k += len(units[u])
    return out


# --------------------------------------------------------------------------- log-probs


def _model_inputs(batch: dict[str, Any], dev: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k].to(dev) for k in keys if k in batch}


def sequence_logps(
    model: Any, head: Head, batch: dict[str, Any], dev: torch.device, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: summed log-prob of its scored tokens [n_seq], token count [n_seq], and
    the summed NLL of the chosen sequences' tokens (scalar). Only the scored positions'
    hidden states go through the LM head (no full [batch, seq, vocab] logits); ``fused``
    (train.fused_loss, a plain linear head) goes further: a chunk of their logits at a time
    (dsft.loss.chunked_logps)."""
    labels, seq = batch["labels"], batch["seq"]
    target, tseq = labels[:, 1:], seq[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    index = (rows * labels.size(1) + cols).to(dev)
    ids = target[rows, cols].to(dev)
    owner = tseq[rows, cols].to(dev)
    hidden = final_hidden(model, _model_inputs(batch, dev))
    picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)
    lin = head_linear(head.module) if fused else None
    if lin is not None:
        lp = chunked_logps(picked, ids, lin, head.softcap)
    else:
        logits = head.module(picked).float()
        if head.softcap:
            logits = head.softcap * torch.tanh(logits / head.softcap)
        lp = torch.log_softmax(logits, dim=-1).gather(1, ids[:, None])[:, 0]
    n_seq = batch["n_seq"]
    logps = torch.zeros(n_seq, dtype=lp.dtype, device=dev).index_add(0, owner, lp)
    counts = torch.bincount(owner, minlength=n_seq).to(lp.dtype)
    chosen_nll = -(lp * (owner < batch["pairs"])).sum()
    return logps, counts, chosen_nll


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --------------------------------------------------------------------------- losses


@dataclass
class PairTerms:
    """Per-pair loss and rewards (chosen/rejected) for one micro-batch."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_losses(
    cfg: PreferenceConfig,
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor | None,
    rr: torch.Tensor | None,
    nc: torch.Tensor,
    nr: torch.Tensor,
) -> PairTerms:
    """The loss of every pair (see the module docstring for the formulas)."""
    beta, eps, kind = cfg.beta, cfg.label_smoothing, cfg.loss_type
    if kind in ("simpo", "orpo"):
        ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        if kind == "simpo":
            logits = (ac - ar) - cfg.simpo_gamma / beta
            losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
            return PairTerms(losses, beta * ac.detach(), beta * ar.detach())
        lam = cfg.orpo_lambda
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        losses = -lam * F.logsigmoid(log_odds)
        return PairTerms(losses, lam * ac.detach(), lam * ar.detach())
    if rc is None or rr is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    cr, rj = pc - rc, pr - rr
    d = cr - rj
    if kind == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif kind == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (
            1 - 2 * eps
        )
    elif kind == "hinge":
        losses = torch.relu(1 - beta * d)
    elif kind == "ipo":
        delta = cr / nc.clamp(min=1) - rj / nr.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"pair_losses: unknown loss_type {kind!r}")
    return PairTerms(losses, beta * cr.detach(), beta * rj.detach())


def kto_losses(
    cfg: PreferenceConfig,
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO per row (desirable / undesirable) and the rewards ``β·(policy - ref)``."""
    ratio = policy - ref
    beta = cfg.beta
    good = cfg.kto_desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = cfg.kto_undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()


# --------------------------------------------------------------------------- the step


@contextlib.contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """The base model's forward: peft's adapters disabled (no-op for a plain model)."""
    module = getattr(model, "module", model)
    if hasattr(module, "disable_adapter"):
        with module.disable_adapter():
            yield
    else:
        yield


class PreferenceStep:
    """What the loop needs from the preference objective: counts of a window (before any
    forward, for the global denominators), and the forward/backward of one micro-batch."""

    def __init__(
        self,
        cfg: PreferenceConfig,
        head: Head,
        dev: torch.device,
        live_reference: Any = None,
        fused: bool = False,
    ) -> None:
        self.cfg, self.head, self.dev, self.fused = cfg, head, dev, fused
        self.live = live_reference  # a frozen model, or "adapter": the engine, adapter off
        self.nll_weight = (
            1.0 if cfg.loss_type == "orpo" else (cfg.rpo_alpha if cfg.loss_type != "kto" else 0.0)
        )

    @staticmethod
    def counts(window: Sequence[dict[str, Any]]) -> list[float]:
        """This rank's pairs and chosen response tokens in a window (host tensors)."""
        pairs = sum(m["pairs"] for m in window)
        toks = sum(int(((m["seq"] >= 0) & (m["seq"] < m["pairs"]))[:, 1:].sum()) for m in window)
        return [pairs, toks]

    def reference(self, engine: Any, micro: dict[str, Any]) -> torch.Tensor | None:
        if not needs_reference(self.cfg):
            return None
        if "ref" in micro:
            return micro["ref"].to(self.dev)
        with torch.no_grad():
            if self.live == "adapter":
                with adapter_off(engine):
                    return sequence_logps(engine, self.head, micro, self.dev, self.fused)[0]
            if self.live is not None:
                return sequence_logps(self.live, self.head_of_live, micro, self.dev, self.fused)[0]
        raise RuntimeError("preference: no reference log-probs for this batch")

    @property
    def head_of_live(self) -> Head:
        from dsft.loss import output_head

        return output_head(getattr(self.live, "module", self.live))  # a DeepSpeed engine's

    def loss(
        self, engine: Any, micro: dict[str, Any], pairs: float, chosen_tokens: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's share of the step loss (to backward) and its metric sums."""
        ref = self.reference(engine, micro)
        logps, counts, nll = sequence_logps(engine, self.head, micro, self.dev, self.fused)
        n = micro["pairs"]
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=self.dev)
        if "desirable" in micro:  # KTO
            assert ref is not None
            kl = (logps[n:] - ref[n:]).detach().mean()
            if torch.distributed.is_initialized() and distributed.get_world_size() > 1:
                torch.distributed.all_reduce(kl)
                kl = kl / distributed.get_world_size()
            kl = kl.clamp(min=0)
            desirable = micro["desirable"].to(self.dev)
            losses, rewards = kto_losses(self.cfg, logps[:n], ref[:n], desirable, kl)
            good, bad = desirable, ~desirable
            terms = PairTerms(losses, rewards * good, rewards * bad)
            sums[SUMS.index("kl")] = kl.double()
            sums[SUMS.index("kl_batches")] = 1
            acc = torch.zeros((), device=self.dev)
            lc, lr_ = (logps[:n] * good).sum(), (logps[:n] * bad).sum()
        else:
            rc, rr = (ref[:n], ref[n:]) if ref is not None else (None, None)
            terms = pair_losses(self.cfg, logps[:n], logps[n:], rc, rr, counts[:n], counts[n:])
            acc = (terms.chosen_rewards > terms.rejected_rewards).sum()
            lc, lr_ = logps[:n].sum(), logps[n:].sum()
        total = terms.losses.sum() / pairs
        if self.nll_weight:
            total = total + self.nll_weight * nll / max(chosen_tokens, 1)
        chosen = (micro["seq"][:, 1:] >= 0) & (micro["seq"][:, 1:] < n)
        values = {
            "chosen_tokens": torch.tensor(float(chosen.sum()), device=self.dev),
            "loss": terms.losses.detach().sum(),
            "nll": nll.detach(),
            "pairs": torch.tensor(float(n), device=self.dev),
            "rewards/chosen": terms.chosen_rewards.sum(),
            "rewards/rejected": terms.rejected_rewards.sum(),
            "rewards/accuracy": acc,
            "rewards/margin": (terms.chosen_rewards - terms.rejected_rewards).sum(),
            "logps/chosen": lc.detach(),
            "logps/rejected": lr_.detach(),
        }
        for k, v in values.items():
            sums[SUMS.index(k)] = v.double()
        return total, sums


def step_metrics(
    sums: Sequence[float], cfg: PreferenceConfig, kto: bool = False
) -> dict[str, float]:
    """Metrics from the all-reduced sums of a step (or of several: sums add)."""
    s = dict(zip(SUMS, sums, strict=True))
    pairs = max(s["pairs"], 1.0)
    nll_w = 1.0 if cfg.loss_type == "orpo" else cfg.rpo_alpha
    out = {
        "loss": s["loss"] / pairs + (nll_w * s["nll"] / max(s["chosen_tokens"], 1) if nll_w else 0),
        "rewards/chosen": s["rewards/chosen"] / pairs,
        "rewards/rejected": s["rewards/rejected"] / pairs,
        "rewards/margin": s["rewards/margin"] / pairs,
        "logps/chosen": s["logps/chosen"] / pairs,
        "logps/rejected": s["logps/rejected"] / pairs,
    }
    if kto:
        out["kl"] = s["kl"] / max(s["kl_batches"], 1)
        del out["rewards/margin"]
    else:
        out["rewards/accuracy"] = s["rewards/accuracy"] / pairs
    if nll_w:
        out["nll"] = s["nll"] / max(s["chosen_tokens"], 1)
    return out


# --------------------------------------------------------------------------- references


def data_digest(pairs: Sequence[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for t in p.sides:
            h.update(np.asarray(t.input_ids, np.int64).tobytes())
            h.update(np.asarray(t.labels, np.int64).tobytes())
            h.update(b"|")
        h.update(b"#")
    return h.hexdigest()


def reference_key(base: dict[str, Any], precision: str, pairs: Sequence[Pair], kind: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(base, sort_keys=True, default=str).encode())
    h.update(precision.encode())
    h.update(kind.encode())
    h.update(data_digest(pairs).encode())
    return h.hexdigest()[:32]


def compute_reference(
    engine: Any,
    head: Head,
    pairs: Sequence[Pair],
    pad_id: int,
    micro_batch: int,
    dev: torch.device,
    fused: bool = False,
) -> np.ndarray:
    """Reference log-probs [n_pairs, 2] (KTO: [n, 2] = completion, mismatched KL sequence,
    computed in fixed groups) of every pair: the engine's forward, adapter off, no
    gradients. Pairs are dealt to the ranks in turn; every rank runs the same number of
    forwards (ZeRO-3 gathers collectively), then one all-reduce assembles the table."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    n = len(pairs)
    out = torch.zeros((n, 2), dtype=torch.float64)
    mine = list(range(rank * micro_batch, n, world * micro_batch))
    rounds = math.ceil(n / (world * micro_batch))
    was_training = engine.training
    engine.eval()
    try:
        with torch.no_grad(), adapter_off(engine):
            for k in range(rounds):
                start = mine[k] if k < len(mine) else None
                idx = list(range(start, min(start + micro_batch, n))) if start is not None else []
                batch_pairs = [pairs[i] for i in idx] or [pairs[0]]  # a dummy keeps lockstep
                partners = [pairs[(i + 1) % n] for i in idx] or [pairs[0]]
                micro = collate_pairs(batch_pairs, pad_id, partners=partners)
                logps = sequence_logps(engine, head, micro, dev, fused)[0].double().cpu()
                if idx:
                    m = len(idx)
                    out[idx, 0] = logps[:m]
                    out[idx, 1] = logps[m : 2 * m]
    finally:
        engine.train(was_training)
    if world > 1:
        out = distributed.all_reduce_sum(out.reshape(-1)).cpu().reshape(n, 2)
    return out.numpy()


def load_or_compute_reference(
    path: Path,
    engine: Any,
    head: Head,
    pairs: Sequence[Pair],
    pad_id: int,
    micro_batch: int,
    dev: torch.device,
    fused: bool = False,
) -> np.ndarray:
    """The reference table at ``path`` if a run already stored it, else computed and stored
    (rank 0 writes; every rank computes its share and receives the whole table)."""
    found = distributed.all_gather_objects(path.is_file())
    if all(found):
        table = np.load(path)
        if table.shape == (len(pairs), 2):
            log.info("preference: reference log-probs reused from %s", path)
            return table
    table = compute_reference(engine, head, pairs, pad_id, micro_batch, dev, fused)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{distributed.get_rank()}.npy")
        np.save(tmp, table)
        tmp.replace(path)
        log.info("preference: reference log-probs of %d pairs stored in %s", len(pairs), path)
    distributed.barrier()
    return table


def attach_reference(micro: dict[str, Any], table: np.ndarray, idx: Sequence[int]) -> None:
    """Put the stored reference of the micro-batch's pairs (``idx``) into it, in its order."""
    t = torch.as_tensor(table[list(idx)], dtype=torch.float32)
    micro["ref"] = torch.cat([t[:, 0], t[:, 1]])


# --------------------------------------------------------------------------- the run


class PreferenceRun:
    """The preference objective of one training run: reference tables, batches, the step,
    validation metrics. The loop calls it where the SFT objective tokenises, collates and
    computes its token loss."""

    def __init__(
        self,
        cfg: Any,
        splits: Any,
        engine: Any,
        pad_id: int,
        out_dir: Path,
        ds_config: dict[str, Any],
        weights_trained: bool = False,
    ) -> None:
        from dsft.checkpoint import _weights_dir, base_fingerprint
        from dsft.data.cache import cache_root
        from dsft.loss import output_head

        self.cfg, self.pref, self.splits, self.pad_id = cfg, cfg.preference, splits, pad_id
        self.ds_config = ds_config
        self.dev = distributed.device()
        self.head = output_head(engine.module)
        self.kto = splits.train_pairs[0].rejected is None
        if self.kto and self.pref.loss_type != "kto":
            raise_config(
                f"preference.loss_type={self.pref.loss_type}: the data are unpaired KTO rows "
                "(prompt/completion/label); set preference.loss_type=kto"
            )
        if not self.kto and self.pref.loss_type == "kto":
            raise_config(
                "preference.loss_type=kto: needs unpaired prompt/completion/label rows; "
                "these are chosen/rejected pairs"
            )
        live = None
        self.tables: dict[str, np.ndarray] = {}
        if needs_reference(self.pref) and self.pref.reference == "live":
            live = "adapter" if hasattr(engine.module, "disable_adapter") else self._frozen_copy()
        elif needs_reference(self.pref):
            base = base_fingerprint(_weights_dir(cfg.model.path, cfg.model.revision))
            lora = getattr(cfg.model, "lora", None)
            kind = f"{self.kto}|lora={bool(lora and lora.enabled)}"
            root = cache_root(cfg.data.cache_dir) / "reference"
            for name, pairs in (("train", splits.train_pairs), ("val", splits.val_pairs)):
                if not pairs:
                    continue
                key = reference_key(base, cfg.train.precision, pairs, kind)
                path = root / f"{key}.npy"
                if weights_trained and not all(distributed.all_gather_objects(path.is_file())):
                    raise_config(
                        "preference.reference=precomputed: a resumed full fine-tune has trained "
                        f"weights, and the reference the first run stored ({path}) is gone; "
                        "restore data.cache_dir or start the run afresh"
                    )
                self.tables[name] = load_or_compute_reference(
                    path,
                    engine,
                    self.head,
                    pairs,
                    pad_id,
                    cfg.eval.micro_batch,
                    self.dev,
                    cfg.train.fused_loss,
                )
        self.step = PreferenceStep(self.pref, self.head, self.dev, live, cfg.train.fused_loss)

    def _frozen_copy(self) -> Any:
        """The live reference of a full fine-tune: ``model.path`` loaded again, frozen, and
        placed like the trained model (under ZeRO-3 partitioned as it loads and wrapped in
        an optimizer-less DeepSpeed engine, whose hooks gather each layer for its forward;
        with parameter offload, in host RAM): the planner counts it so."""
        from dsft.model import build_model, torch_dtype

        frozen = dataclasses.replace(
            self.cfg.model, lora=dataclasses.replace(self.cfg.model.lora, enabled=False)
        )
        model = build_model(frozen, torch_dtype(self.cfg.train.precision), self.ds_config)
        model.requires_grad_(False).eval()
        if self.ds_config["zero_optimization"]["stage"] != 3:
            return model.to(self.dev)
        deepspeed = distributed.import_deepspeed()
        conf = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
        ref, *_ = deepspeed.initialize(model=model, config=conf)
        ref.eval()  # DeepSpeed's eval() returns None, not the engine
        return ref

    def micro_batch(self, units: Sequence[Sequence[int]], batch: Sequence[int]) -> dict[str, Any]:
        """The collated pairs of one micro-batch (packed rows with data.packing)."""
        idx = [i for u in batch for i in units[u]]
        pairs = self.splits.train_pairs
        partners = [pairs[(i + 1) % len(pairs)] for i in idx] if self.kto else None
        rows = pair_rows(units, batch) if self.splits.packs else None
        micro = collate_pairs([pairs[i] for i in idx], self.pad_id, rows, partners)
        if "train" in self.tables:
            attach_reference(micro, self.tables["train"], idx)
        return micro

    def metrics(self, sums: Sequence[float]) -> dict[str, float]:
        return step_metrics(sums, self.pref, self.kto)

    def batch(
        self, splits: Any, units: list[list[int]], batch: list[int], pad_id: int
    ) -> dict[str, Any]:
        """The objective's ``batch`` (dsft.step.Objective)."""
        return self.micro_batch(units, batch)

    def train_step(self, engine: Any, window: Window) -> StepResult:
        """One optimizer step of preference tuning on ``window`` (dsft.step.Objective.step).

        The pairs and chosen response tokens of the global batch are counted on the host
        before any forward (one all-reduce); each micro-batch backwards its share of the
        step loss (pair losses over the global pair count, plus the NLL term over the global
        chosen-token count) times DeepSpeed's gradient divisor, so neither accumulation nor
        the number of ranks changes the step. The loss, the stop flag and the metric sums
        travel in one all-reduce after the step.
        """
        ds, dev = engine.ds, engine.device
        pairs, chosen = distributed.all_reduce_sum(self.step.counts(window.micro_batches))
        pairs, chosen = float(pairs), float(chosen)
        own_norm = None
        step_loss = torch.zeros((), dtype=torch.float64, device=dev)
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=dev)
        tokens = sq_tokens = 0
        skipped_before = ds.skipped_steps
        for i, micro in enumerate(window.micro_batches):
            lengths = micro.pop("lengths")  # real tokens per sequence (for throughput)
            total, s = self.step.loss(ds, micro, pairs, chosen)
            if window.nan_fault:
                total = total * float("nan")  # test hook: a step whose loss blows up
            ds.backward(total * engine.grad_divisor, scale_wrt_gas=False)
            if i == len(window.micro_batches) - 1 and engine.zero0_fp32:
                own_norm = guard_zero0_fp32_step(ds)
            ds.step()  # clips and steps only at the accumulation boundary
            step_loss += total.detach().double()
            sums += s
            tokens += int(lengths.sum())
            sq_tokens += int((lengths**2).sum())
        stop = torch.tensor([float(distributed.stop_requested() is not None)], device=dev)
        reduced = distributed.all_reduce_sum(
            torch.cat([step_loss.reshape(1), stop.double(), sums])
        ).tolist()
        metrics = self.metrics(reduced[2:])
        metrics.pop("loss")
        return StepResult(
            loss=reduced[0],
            targets=pairs,
            tokens=tokens,
            sq_tokens=sq_tokens,
            skipped=ds.skipped_steps > skipped_before,
            stop=bool(reduced[1]),
            grad_norm=own_norm,
            metrics=metrics,
        )

    @torch.no_grad()
    def validation(self, engine: Any) -> dict[str, float]:
        """Preference metrics of the validation pairs (exact over ranks: sums, one reduce)."""
        pairs = self.splits.val_pairs
        if not pairs:
            return {}
        mb = self.cfg.eval.micro_batch
        world, rank = distributed.get_world_size(), distributed.get_rank()
        mine = list(range(rank * mb, len(pairs), world * mb))
        rounds = distributed.all_reduce_max(len(mine))
        total = torch.zeros(len(SUMS), dtype=torch.float64, device=self.dev)
        was = engine.training
        engine.eval()
        try:
            for k in range(rounds):
                idx = list(range(mine[k], min(mine[k] + mb, len(pairs)))) if k < len(mine) else []
                use = idx or [0]
                partners = [pairs[(i + 1) % len(pairs)] for i in use] if self.kto else None
                micro = collate_pairs([pairs[i] for i in use], self.pad_id, partners=partners)
                if "val" in self.tables:
                    attach_reference(micro, self.tables["val"], use)
                n = len(use)
                _, sums = self.step.loss(engine, micro, n, 1.0)
                if idx:
                    total += sums
        finally:
            engine.train(was)
        total = distributed.all_reduce_sum(total.cpu())
        out = self.metrics(total.tolist())
        return out


def raise_config(message: str) -> None:
    from dsft.errors import ConfigError

    raise ConfigError([message])


# --------------------------------------------------------------------------- the objective


def prepare(cfg: Any, tokenizer: Any, builder: bool = True) -> Any:
    """The objective's data preparation (dsft.job.open_job): tokenised pairs per split."""
    from dsft.data.pairs import prepare_pairs

    return prepare_pairs(cfg, tokenizer)


def start(job: Any, engine: Any) -> Objective:
    """The preference objective bound to the built engine: references computed (or loaded)
    now, before the first step; with a resume, read from the store the first run left."""
    cfg = job.cfg
    run = PreferenceRun(
        cfg,
        job.splits,
        engine.ds,
        job.tokenizer.pad_token_id,
        job.out,
        job.ds_config,
        weights_trained=engine.resumed_from is not None and not cfg.model.lora.enabled,
    )
    return Objective("dpo", prepare, run.batch, run.train_step, validation=run.validation)


def _not_started(*_: Any) -> Any:
    raise RuntimeError("the dpo objective runs once started (Objective.start) on its engine")


# train.objective=dpo (dsft.objectives): started on the engine by the loop
DPO = Objective("dpo", prepare, _not_started, _not_started, start=start)
