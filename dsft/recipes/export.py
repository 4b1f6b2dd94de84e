"""``dsft export CHECKPOINT OUT``: a checkpoint of any ZeRO stage to a Hugging Face directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsft.export import export_checkpoint


def main(ns: argparse.Namespace) -> int:
    export_checkpoint(ns.checkpoint, Path(ns.out), merged=not ns.adapter_only)
    return 0
