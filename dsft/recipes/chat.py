"""``dsft chat RUN_OR_MODEL``: talk to a fine-tuned model in the terminal.

RUN_OR_MODEL is an exported model directory, a LoRA adapter directory (its
``adapter_config.json`` names the base, or ``--base`` does), or a run directory (its ``best``
export when there is one, else ``final``). Each turn is rendered with the model's chat template
(the one training used: the export saves it) and the answer is streamed as it is generated.
``--prompt TEXT`` answers once and exits; otherwise ``/reset`` starts a new conversation and
``/exit`` (or end of input, Ctrl-D) ends it. ``--image PATH`` (repeatable) shows a
multimodal model pictures: they go with the first question, through the model's processor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from dsft.data.formats import IMAGE_PLACEHOLDER
from dsft.data.readers import open_image
from dsft.data.template import render
from dsft.data.tokenize import image_text, processor_of
from dsft.errors import ConfigError, DataError
from dsft.model import load_for_inference, locate_trained


def load(ns: argparse.Namespace) -> tuple[Any, Any, torch.device, str]:
    """The model (with its adapter) on the chosen device, the tokenizer, and what was loaded."""
    model_dir, adapter, tok_dir = locate_trained(ns.model, ns.base)
    what = f"{adapter} on {model_dir}" if adapter is not None else str(model_dir)
    device = torch.device(
        ns.device if ns.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    model, tokenizer = load_for_inference(
        model_dir, adapter, tok_dir, device=device, trust_remote_code=ns.trust_remote_code
    )
    return model, tokenizer, device, what


def _images(ns: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The ``--image`` pictures, decoded; a text-only model or a bad image is a ConfigError."""
    paths = getattr(ns, "image", None) or []
    if not paths:
        return []
    if processor_of(tokenizer) is None:
        why = getattr(tokenizer, "dsft_processor_error", "") or "it has no image processor"
        raise ConfigError([f"--image: {ns.model} cannot take images ({why})"])
    try:
        return [open_image(str(Path(p).resolve()), at="--image") for p in paths]
    except DataError as e:
        raise ConfigError([str(e)]) from None


@torch.no_grad()
def answer(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    ns: argparse.Namespace,
    device: torch.device,
) -> str:
    """Generate the assistant's reply to ``messages``, printing it token by token."""
    from transformers import TextStreamer

    text = render(tokenizer, messages, add_generation_prompt=True)
    images = getattr(ns, "images", None)
    if images:  # the placeholders become the processor's image tokens, expanded by it
        proc = processor_of(tokenizer)
        text = text.replace(IMAGE_PLACEHOLDER, image_text(tokenizer))
        ids = proc(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
        ids = ids.to(device)
        ids = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in ids.items()}
    else:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = ns.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample}
    if sample:
        kwargs.update(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k)
    out = model.generate(
        **ids,
        max_new_tokens=ns.max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def main(ns: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config notices would interleave the answer
    torch.manual_seed(ns.seed)
    model, tokenizer, device, what = load(ns)
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    ns.images = _images(ns, tokenizer)
    first = IMAGE_PLACEHOLDER * len(ns.images)  # the pictures go with the first question
    if ns.prompt is not None:
        answer(
            model, tokenizer, [*system, {"role": "user", "content": first + ns.prompt}], ns, device
        )
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {what} on {device} (/reset: new conversation, /exit or Ctrl-D: quit)")
    messages = list(system)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":  # (the images go with the next first question again)
            messages = list(system)
            continue
        if not cmd:
            continue
        is_first = not any(m["role"] == "user" for m in messages)
        messages.append({"role": "user", "content": (first if is_first else "") + line})
        print("assistant> ", end="", flush=True)
        messages.append(
            {"role": "assistant", "content": answer(model, tokenizer, messages, ns, device)}
        )
