"""``dsft export CHECKPOINT OUT [--push-to-hub ORG/NAME]``: a checkpoint of any ZeRO stage to
a Hugging Face directory with a model card, optionally uploaded to the Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsft.hf_export import export_checkpoint, push_to_hub


def main(ns: argparse.Namespace) -> int:
    out = export_checkpoint(ns.checkpoint, Path(ns.out), merged=not ns.adapter_only)
    if ns.push_to_hub:
        # The merged model is the export's top level; an adapter-only export (--adapter-only,
        # or QLoRA) has only the adapter to share.
        folder = out if (out / "config.json").is_file() else out / "adapter"
        url = push_to_hub(folder, ns.push_to_hub, private=ns.private)
        print(f"uploaded {folder} to {url}", flush=True)
    return 0
