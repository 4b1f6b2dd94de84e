"""The training objectives by name (``train.objective``): what the loop is generic over.

``sft`` is supervised fine-tuning (dsft.step.SFT); ``dpo`` preference tuning, the DPO family
(dsft.preference.DPO). Both run in the same loop (dsft/recipes/train.py).
"""

from __future__ import annotations

from dsft.config import Config
from dsft.preference import DPO
from dsft.step import SFT, Objective


def objective_for(cfg: Config) -> Objective:
    """The training objective of ``cfg`` (``train.objective``)."""
    return DPO if cfg.train.objective == "dpo" else SFT
