"""Synthetic models and data, built here with nothing downloaded: the character-level demo
tokenizer (with a chat template), randomly initialised Llama-shaped model directories (the
demo's tiny one, the tests' tinier ones, the benchmark's and the GPU check's 1B one), and the
demo's four string tasks; and tiny multimodal checkpoints of each vision-language family
(``build_vlm_dir``):

  reverse     "Reverse" + "abcde"     -> "edcba"
  sort        "Sort" + "dbca"         -> "abcd"
  capitalise  "Capitalise" + "hello"  -> "HELLO"
  add         "Add" + "17+5"          -> "22"    (operands 0-19)
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
DEMO_DATA = ASSETS / "demo_tasks.jsonl"

SPECIAL = ["<pad>", "<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> Any:
    """A character-level fast tokenizer: one token per character, plus chat markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without separators
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(
    out: str | Path,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 4,
    *,
    tokenizer: Any = None,
    shape: dict[str, Any] | None = None,
    dtype: Any = None,
    device: str | None = None,
    **config: Any,
) -> Path:
    """Save a randomly initialised Llama and a tokenizer (the demo's by default) to ``out``.

    The shape is the demo's (``hidden``, ``layers``) unless ``shape`` gives one (for example
    ``planner.SHAPES["llama-1b"]``); its vocabulary grows to the tokenizer's if smaller.
    ``config`` adds LlamaConfig fields (``rope_theta``, ``max_position_embeddings``...).
    ``device="cuda"`` initialises the weights there, in ``dtype`` (an 8B model in seconds).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    fields = (
        dict(shape)
        if shape
        else {
            "hidden_size": hidden,
            "intermediate_size": hidden * 3,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
        }
    )
    fields["vocab_size"] = max(fields.get("vocab_size", 0), len(tok))
    fields = {"max_position_embeddings": 256, **fields, **config}
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llama = LlamaConfig(**fields, pad_token_id=tok.pad_token_id, **ids)
    torch.manual_seed(seed)
    if device is None:
        model = LlamaForCausalLM(llama)
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype or default)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(llama)
        finally:
            torch.set_default_dtype(default)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, **ids)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# Tiny mixtures of experts (hidden 32, 2 layers, 4 experts, top-2) of transformers' own
# config classes: model_type -> (config class, causal LM class, family-specific fields).
MOE_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 16, "head_dim": 8},
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "num_local_experts": 4,
            "head_dim": 8,
            "sliding_window": 8,
            "max_position_embeddings": 131072,  # its YaRN rope's (4096 x 32)
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "n_routed_experts": 4,
            "num_key_value_heads": 4,  # multi-head latent attention: as many as heads
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 8,
            "q_lora_rank": 8,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 8,
        },
    ),
}


def build_moe_model_dir(
    out: str | Path, family: str, seed: int = 0, tokenizer: Any = None, **config: Any
) -> Path:
    """Save a randomly initialised tiny mixture of experts of ``family`` (a key of
    :data:`MOE_FAMILIES`: hidden 32, 2 layers, 4 experts, top-2) and the demo's tokenizer."""
    import torch
    import transformers
    from transformers import GenerationConfig

    out = Path(out)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    cfg_name, model_name, own = MOE_FAMILIES[family]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    fields = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        **own,
        **config,
    }
    cfg = getattr(transformers, cfg_name)(**fields, pad_token_id=tok.pad_token_id, **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, **ids)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def generate_tasks(n: int = 8000, seed: int = 1234) -> list[dict[str, str]]:
    """``n`` instruction records, the four tasks in turn; deterministic in ``seed``.

    Instructions are single words to keep sequences short: the demo must learn
    four tasks from scratch in about two minutes on two CPU cores.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = ("Reverse", "Sort", "Capitalise", "Add")[i % 4]
        if task == "Add":
            a, b = rng.randint(0, 19), rng.randint(0, 19)
            rows.append(task_row(task, f"{a}+{b}"))
        else:
            rows.append(task_row(task, _word(rng, 3, 7 if task == "Capitalise" else 6)))
    return rows


def task_row(task: str, inp: str) -> dict[str, str]:
    """One instruction record of a demo task, with its correct answer."""
    if task == "Add":
        a, b = (int(x) for x in inp.split("+"))
        out = str(a + b)
    else:
        out = {"Reverse": inp[::-1], "Sort": "".join(sorted(inp)), "Capitalise": inp.upper()}[task]
    return {"instruction": task, "input": inp, "output": out}


def generate_hard_tasks(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` records of the demo tasks where its SFT model errs most (about 1 in 10): reverse
    and sort of 5-6 letter words, sums of two operands from 10 to 19. Capitalise, solved
    almost always, is left out."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = ("Reverse", "Sort", "Add")[i % 3]
        if task == "Add":
            rows.append(task_row(task, f"{rng.randint(10, 19)}+{rng.randint(10, 19)}"))
        else:
            rows.append(task_row(task, _word(rng, 5, 6)))
    return rows


def _wrong(rng: random.Random, task: str, inp: str, right: str) -> str:
    """A plausible wrong answer: the kind of mistake a half-trained model makes."""
    if task == "Add":
        a, b = (int(x) for x in inp.split("+"))
        return str(a + b + rng.choice([-2, -1, 1, 2, 10]))
    if task == "Capitalise":
        k = rng.randrange(len(right))
        return right[:k] + right[k].lower() + right[k + 1 :]
    wrong = list(right)
    i = rng.randrange(len(wrong) - 1)
    j = rng.randrange(i + 1, len(wrong))
    wrong[i], wrong[j] = wrong[j], wrong[i]
    out = "".join(wrong)
    return out if out != right else right[1:] + right[0] if len(set(right)) > 1 else inp + "x"


def generate_preference_pairs(n: int = 2000, seed: int = 4321) -> list[dict[str, Any]]:
    """``n`` preference rows (TRL's conversational format) from the demo's four tasks: the
    chosen answer is correct, the rejected one plausible and wrong (an off-by-one sum, two
    letters swapped, one letter not capitalised)."""
    return synthetic_pairs(generate_tasks(n, seed), seed)


def synthetic_pairs(tasks: list[dict[str, str]], seed: int) -> list[dict[str, Any]]:
    """Preference rows of ``tasks``: the correct answer chosen, a made-up wrong one rejected."""
    rng = random.Random(seed)
    wrong = [_wrong(rng, r["instruction"], r["input"], r["output"]) for r in tasks]
    return [preference_row(r, w) for r, w in zip(tasks, wrong, strict=True) if w != r["output"]]


def on_policy_pairs(tasks: list[dict[str, str]], answers: list[list[str]]) -> list[dict[str, Any]]:
    """Preference rows from a model's own answers (``answers[k][i]``: its k-th answer to
    ``tasks[i]``, e.g. greedy then sampled): the first wrong one rejected, the correct answer
    chosen. Tasks it answered right every time give no pair: the pairs target exactly the
    model's errors."""
    rows = []
    for i, r in enumerate(tasks):
        wrong = next((a[i] for a in answers if a[i].strip() != r["output"]), None)
        if wrong is not None:
            rows.append(preference_row(r, wrong.strip()))
    return rows


def preference_row(task: dict[str, str], rejected: str) -> dict[str, Any]:
    """A TRL conversational preference row: the task's prompt, its answer, ``rejected``."""
    prompt = f"{task['instruction']}\n\n{task['input']}"  # as dsft renders instruction rows
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": task["output"]}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_tasks(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------ tiny multimodal checkpoints
# Tiny random multimodal checkpoints, built from transformers' own config and model classes
# and saved as the published ones are: the ``*ForConditionalGeneration`` class with its vision
# tower and projector, the demo's character tokenizer grown by the family's image tokens, and a
# processor where the family's processor loads: the Qwen-VL families' (their video processor
# needs torchvision) only where torchvision is installed (the GPU machine).
#
# ``build_vlm_dir(out, family)``; ``VLM_FAMILIES`` lists the families and ``VLM_IMAGE_FAMILIES`` those
# whose processor runs without torchvision (the others are tested text-only on CPU, their image
# path by benchmarks/vlm_gpu_check.py).

# A chat template that takes plain string content and HF content parts alike; each image
# part becomes the family's image placeholder, which the processor expands.
VLM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% elif p['type'] == 'image' %}{{ image_placeholder }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# family -> (image tokens the tokenizer needs, the placeholder a prompt carries)
_TOKENS: dict[str, tuple[list[str], str]] = {
    "gemma3": (["<start_of_image>", "<image_soft_token>", "<end_of_image>"], "<start_of_image>"),
    "gemma4": (["<|image>", "<|image|>", "<image|>", "<|audio|>", "<|video|>"], "<|image|>"),
    "llava": (["<image>"], "<image>"),
    "smolvlm": (["<image>", "<fake_token_around_image>", "<global-img>"], "<image>"),
    "idefics3": (["<image>", "<fake_token_around_image>", "<global-img>"], "<image>"),
    "mistral3": (["[IMG]", "[IMG_BREAK]", "[IMG_END]"], "[IMG]"),
    "llama4": (["<|image_start|>", "<|image|>", "<|image_end|>", "<|patch|>"], "<|image|>"),
}
_QWEN_TOKENS = (
    ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "<|vision_start|><|image_pad|><|vision_end|>",
)
_TOKENS.update(dict.fromkeys(["qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe"], _QWEN_TOKENS))
VLM_FAMILIES = tuple(_TOKENS)
# Families whose image processor (and so processor) works without torchvision.
VLM_IMAGE_FAMILIES = ("gemma3", "llava", "idefics3")
# Families whose processor needs torchvision (a video processor): image rows on the GPU machine.
VLM_QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe")

VLM_H = 32  # hidden size of every tiny tower and language model
VLM_IMAGE = 32  # image side in pixels


def build_vlm_tokenizer(family: str) -> Any:
    """The demo's character tokenizer with the family's image tokens as special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra, placeholder = _TOKENS[family]
    specials = SPECIAL + extra
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    named: dict[str, str] = {}
    if family == "gemma3":
        named = {"boi_token": extra[0], "image_token": extra[1], "eoi_token": extra[2]}
    elif family == "gemma4":
        named = {
            "boi_token": extra[0],
            "image_token": extra[1],
            "eoi_token": extra[2],
            "audio_token": extra[3],
            "video_token": extra[4],
        }
    elif family in ("llava", "smolvlm", "idefics3"):
        named = {"image_token": "<image>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named or None,
    )
    fast.chat_template = VLM_TEMPLATE.replace("{{ image_placeholder }}", placeholder)
    return fast


def _llama_text(vocab: int, tok: Any, **more: Any) -> dict[str, Any]:
    return dict(
        hidden_size=VLM_H,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **more,
    )


def _vision(**more: Any) -> dict[str, Any]:
    return dict(
        hidden_size=VLM_H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **more
    )


def vlm_config(family: str, tok: Any) -> Any:
    """The family's tiny multimodal config for tokenizer ``tok``."""
    import transformers as tf

    vocab = len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _TOKENS[family][0]}
    text = _llama_text(vocab, tok)
    if family == "gemma3":
        return tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**text, head_dim=8, sliding_window=16),
            vision_config=tf.SiglipVisionConfig(**_vision(image_size=VLM_IMAGE, patch_size=8)),
            mm_tokens_per_image=4,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
        )
    if family == "gemma4":
        return tf.Gemma4Config(
            text_config=tf.Gemma4TextConfig(
                **text,
                head_dim=8,
                sliding_window=16,
                global_head_dim=8,
                hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=vocab,
                num_kv_shared_layers=0,
            ),
            vision_config=tf.Gemma4VisionConfig(**_vision(head_dim=8)),
            audio_config=None,
            boi_token_id=ids["<|image>"],
            eoi_token_id=ids["<image|>"],
            image_token_id=ids["<|image|>"],
            audio_token_id=ids["<|audio|>"],
            video_token_id=ids["<|video|>"],
        )
    if family == "llava":
        return tf.LlavaConfig(
            text_config=tf.LlamaConfig(**text),
            vision_config=tf.CLIPVisionConfig(
                **_vision(image_size=VLM_IMAGE, patch_size=8, projection_dim=VLM_H)
            ),
            image_token_index=ids["<image>"],
            projector_hidden_act="gelu",
            vision_feature_layer=-1,
            image_seq_length=(VLM_IMAGE // 8) ** 2,
        )
    if family in ("smolvlm", "idefics3"):
        cls = tf.SmolVLMConfig if family == "smolvlm" else tf.Idefics3Config
        vis = tf.SmolVLMVisionConfig if family == "smolvlm" else tf.Idefics3VisionConfig
        return cls(
            text_config=tf.LlamaConfig(**text),
            vision_config=vis(**_vision(image_size=VLM_IMAGE, patch_size=8)),
            image_token_id=ids["<image>"],
            scale_factor=2,
            pad_token_id=tok.pad_token_id,
        )
    if family == "mistral3":
        return tf.Mistral3Config(
            text_config=tf.MistralConfig(**text, head_dim=8),
            vision_config=tf.PixtralVisionConfig(
                **_vision(image_size=VLM_IMAGE, patch_size=8, head_dim=8)
            ),
            image_token_index=ids["[IMG]"],
            spatial_merge_size=2,
            vision_feature_layer=-1,
        )
    if family == "llama4":
        return tf.Llama4Config(
            text_config=tf.Llama4TextConfig(
                **text,
                head_dim=8,
                intermediate_size_mlp=64,
                num_local_experts=2,
                interleave_moe_layer_step=1,
                attention_chunk_size=64,
            ),
            vision_config=tf.Llama4VisionConfig(
                **_vision(
                    image_size=VLM_IMAGE,
                    patch_size=8,
                    vision_output_dim=VLM_H,
                    projector_input_dim=VLM_H,
                    projector_output_dim=VLM_H,
                    pixel_shuffle_ratio=0.5,
                )
            ),
            boi_token_index=ids["<|image_start|>"],
            eoi_token_index=ids["<|image_end|>"],
            image_token_index=ids["<|image|>"],
        )
    if family in ("qwen2_5_vl", "qwen3_vl"):
        # multimodal RoPE: the (t, h, w) sections split head_dim / 2 = 4 rotary pairs
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        vision = dict(hidden_size=VLM_H, intermediate_size=64, depth=2, num_heads=4,
                      out_hidden_size=VLM_H, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2)  # fmt: skip
        if family == "qwen2_5_vl":
            cls = tf.Qwen2_5_VLConfig
            text_cfg = tf.Qwen2_5_VLTextConfig(**text, rope_parameters=rope)
            vis = tf.Qwen2_5_VLVisionConfig(**vision, window_size=32, fullatt_block_indexes=[1])
        else:
            cls = tf.Qwen3VLConfig
            text_cfg = tf.Qwen3VLTextConfig(
                **text, head_dim=8, rope_parameters={**rope, "mrope_interleaved": True}
            )
            vis = tf.Qwen3VLVisionConfig(
                **vision, num_position_embeddings=64, deepstack_visual_indexes=[0]
            )
        return cls(
            text_config=text_cfg,
            vision_config=vis,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
    if family in ("qwen3_5", "qwen3_5_moe"):
        moe = family == "qwen3_5_moe"
        cls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        text_cls = tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig
        vis_cls = tf.Qwen3_5MoeVisionConfig if moe else tf.Qwen3_5VisionConfig
        more: dict[str, Any] = dict(
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        )
        if moe:
            more.update(
                num_experts=2,
                num_experts_per_tok=1,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
            )
        return cls(
            text_config=text_cls(**text, **more),
            vision_config=vis_cls(
                hidden_size=VLM_H,
                intermediate_size=64,
                depth=2,
                num_heads=4,
                out_hidden_size=VLM_H,
                patch_size=8,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
    raise ValueError(f"unknown family {family!r}; one of {', '.join(VLM_FAMILIES)}")


def build_vlm_processor(family: str, tok: Any, config: Any) -> Any:
    """The family's processor (a PIL image processor where there is one), or None where it
    needs torchvision and this machine has none."""
    import transformers as tf

    if family == "gemma3":
        ip = tf.Gemma3ImageProcessorPil(size={"height": VLM_IMAGE, "width": VLM_IMAGE})
        return tf.Gemma3Processor(
            image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template
        )
    if family == "llava":
        ip = tf.CLIPImageProcessorPil(
            size={"shortest_edge": VLM_IMAGE}, crop_size={"height": VLM_IMAGE, "width": VLM_IMAGE}
        )
        return tf.LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="full",
            chat_template=tok.chat_template,
        )
    if family == "idefics3":  # (SmolVLM's processor needs a video processor: torchvision)
        ip = tf.Idefics3ImageProcessorPil(
            size={"longest_edge": VLM_IMAGE},
            do_image_splitting=False,
            max_image_size={"longest_edge": VLM_IMAGE},
        )
        seq = int((VLM_IMAGE // 8) ** 2 / 4)  # patches over scale_factor²
        return tf.Idefics3Processor(
            image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=tok.chat_template
        )
    if family in VLM_QWEN_FAMILIES:
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:
            return None
        # the published processors: Qwen2.5-VL's own, Qwen3-VL's for Qwen3-VL and Qwen3.5
        qwen25 = family == "qwen2_5_vl"
        sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2,
                     size={"shortest_edge": VLM_IMAGE**2, "longest_edge": (2 * VLM_IMAGE) ** 2})  # fmt: skip
        video = tf.Qwen2VLVideoProcessor if qwen25 else tf.Qwen3VLVideoProcessor
        proc = tf.Qwen2_5_VLProcessor if qwen25 else tf.Qwen3VLProcessor
        return proc(
            image_processor=tf.Qwen2VLImageProcessor(**sizes),
            video_processor=video(**sizes),
            tokenizer=tok,
            chat_template=tok.chat_template,
        )
    return None


def vlm_class(family: str) -> Any:
    import transformers as tf

    return {
        "gemma3": tf.Gemma3ForConditionalGeneration,
        "gemma4": tf.Gemma4ForConditionalGeneration,
        "llava": tf.LlavaForConditionalGeneration,
        "smolvlm": tf.SmolVLMForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "mistral3": tf.Mistral3ForConditionalGeneration,
        "llama4": tf.Llama4ForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen3_5": tf.Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": tf.Qwen3_5MoeForConditionalGeneration,
    }[family]


def build_vlm_dir(out: str | Path, family: str, seed: int = 0) -> Path:
    """Save a tiny random ``family`` checkpoint (model, tokenizer, processor) to ``out``."""
    import torch
    from transformers import GenerationConfig

    out = Path(out)
    tok = build_vlm_tokenizer(family)
    config = vlm_config(family, tok)
    torch.manual_seed(seed)
    model = vlm_class(family)(config)
    # Some families initialise their projector to zero (Gemma 3's): image features would
    # then carry nothing, unlike a published checkpoint's; give such weights random values.
    from dsft.model import part

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and part(name) != "language" and not p.any():
                p.normal_(0.0, p.size(0) ** -0.5)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, **ids)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    processor = build_vlm_processor(family, tok, config)
    if processor is not None:
        processor.save_pretrained(out)
    return out


COLOUR_QUESTION = "What colour is this?"
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (240, 220, 20),
}


def _colour(rng: random.Random, name: str, jitter: int) -> tuple[int, int, int]:
    """``name``'s RGB, each channel moved by up to ±``jitter`` (clipped to 0..255)."""
    r, g, b = (min(255, max(0, c + rng.randint(-jitter, jitter))) for c in COLOURS[name])
    return r, g, b


def write_colour_task(
    folder: str | Path,
    n: int = 200,
    seed: int = 0,
    text_every: int = 0,
    forms: bool = True,
    jitter: int = 0,
) -> Path:
    """A synthetic visual task: "What colour is this?" about a solid-colour image, answered
    with its colour's initial, R, G, B or Y (chance: 1 in 4; one token for the demo's
    character tokenizer, so a tiny model learns it in a few dozen steps). Images are PNG files next to ``data.jsonl``
    (relative paths); with ``forms`` every third row uses the ``images`` column with an
    ``<image>`` placeholder (LLaMA-Factory) and every fifth a base64 ``data:`` URI. With
    ``text_every`` = k, every k-th row is text-only (mixed batches). With ``jitter`` > 0 every
    image row has its own picture (``img/<row>.png``: a random size, each channel of its colour
    moved by up to ±``jitter``), so no two rows show the same image (the benchmark's form)."""
    import base64
    import io

    from PIL import Image

    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    for name, rgb in COLOURS.items():
        size = (rng.randint(24, 48), rng.randint(24, 48))
        Image.new("RGB", size, rgb).save(folder / "img" / f"{name}.png")
    rows = []
    for i in range(n):
        colour = names[rng.randrange(4)]
        answer = colour[0].upper()
        if text_every and i % text_every == text_every - 1:
            w = _word(rng, 3, 6)
            rows.append({"messages": [{"role": "user", "content": f"Reverse {w}"},
                                      {"role": "assistant", "content": w[::-1]}]})  # fmt: skip
            continue
        ref = f"img/{colour}.png"
        if jitter:
            size = (rng.randint(24, 48), rng.randint(24, 48))
            Image.new("RGB", size, _colour(rng, colour, jitter)).save(folder / "img" / f"{i}.png")
            ref = f"img/{i}.png"
        if forms and i % 5 == 4:
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), COLOURS[colour]).save(buf, format="PNG")
            ref = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        if forms and i % 3 == 2:
            rows.append({"messages": [{"role": "user", "content": "<image>" + COLOUR_QUESTION},
                                      {"role": "assistant", "content": answer}],
                         "images": [ref]})  # fmt: skip
        else:
            part = {"type": "image", "url" if ref.startswith("data:") else "path": ref}
            rows.append({"messages": [
                {"role": "user", "content": [part, {"type": "text", "text": COLOUR_QUESTION}]},
                {"role": "assistant", "content": answer}]})  # fmt: skip
    path = folder / "data.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def colour_probes(
    per_colour: int = 3, seed: int | None = None, jitter: int = 0
) -> list[tuple[str, Any]]:
    """Held-out pictures for :func:`colour_accuracy`: (colour, PIL image) pairs,
    ``per_colour`` of each colour. ``seed`` None: three fixed sizes of the exact colours;
    else random sizes and colours moved by up to ±``jitter`` (pick a seed the training data
    did not use)."""
    from PIL import Image

    fixed = [(24, 30), (40, 40), (48, 26)]
    rng = random.Random(seed)
    probes = []
    for name in COLOURS:
        for k in range(per_colour):
            if seed is None:
                size, rgb = fixed[k % len(fixed)], COLOURS[name]
            else:
                size = (rng.randint(24, 48), rng.randint(24, 48))
                rgb = _colour(rng, name, jitter)
            probes.append((name, Image.new("RGB", size, rgb)))
    return probes


def colour_accuracy(export: str | Path, probes: list[tuple[str, Any]] | None = None) -> float:
    """Exact match of a colour-task model (loaded as a user would: AutoModelForImageTextToText
    + AutoProcessor) on held-out pictures (:func:`colour_probes`): its greedy answer is the
    colour's initial. Any trainer's export is scored by this same code."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export).eval()
    proc = AutoProcessor.from_pretrained(export)
    ask = [{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": COLOUR_QUESTION}]}]  # fmt: skip
    text = proc.apply_chat_template(ask, add_generation_prompt=True, tokenize=False)
    right = 0
    probes = colour_probes() if probes is None else probes
    for name, img in probes:
        inputs = proc(text=[text], images=[[img]], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        got = proc.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        right += got.strip() == name[0].upper()
    return right / len(probes)


if __name__ == "__main__":  # `python -m dsft.synthetic`: regenerate the bundled demo dataset
    write_tasks(DEMO_DATA, generate_tasks())
