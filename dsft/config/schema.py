"""Typed run configuration: the single source of defaults.

A run is described by nested dataclasses. Users write a YAML file holding only
what differs from the defaults and may override any field on the command line
with dotted keys (``train.lr=2e-5 data.max_len=512``). Loading collects *every*
problem (unknown keys, wrong types, inconsistent values) and raises one
:class:`ConfigError` listing them all, each with a hint on how to fix it.

The schema and its checks (dsft/config/schema.py); loading in dsft/config/loading.py, the
batch equation in dsft/config/batch.py. The package imports nothing from the rest of dsft
but its exceptions (it is the bottom layer).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from dsft.flops import text_config


@dataclass
class LoraConfig:
    """LoRA adapters through peft; the base weights stay frozen."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names (suffixes) to adapt, or ["all-linear"] for every linear layer but the head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full next to the adapters and saved with them (e.g. ["lm_head"]).
    modules_to_save: list[str] = field(default_factory=list)
    use_dora: bool = False  # DoRA: weight-decomposed LoRA (adds a magnitude vector per layer)
    use_rslora: bool = False  # rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r
    # Adapter initialisation (peft's init_lora_weights): default (A Kaiming, B zero), gaussian
    # (A Gaussian, B zero), pissa (A, B from the weight's top singular vectors, the base keeps
    # the residual; full SVD, not under ZeRO-3), loftq (A, B fit the NF4 quantisation error of
    # the base; CUDA + bitsandbytes, not under ZeRO-3).
    init: Literal["default", "gaussian", "pissa", "loftq"] = "default"
    # Mixture of experts: adapters on the fused expert weights too (peft target_parameters,
    # without dropout: peft has none there); false = attention, router and shared experts only.
    experts: bool = True


@dataclass
class FreezeConfig:
    """Parameters that keep their pretrained values (no gradient, no optimizer state)."""

    embeddings: bool = False  # the input embeddings (a head tied to them stays frozen too)
    bottom_layers: int = 0  # the first N transformer blocks
    patterns: list[str] = field(default_factory=list)  # regexes searched in parameter names
    vision: bool = True  # a multimodal model's vision (or audio) tower; false trains it
    projector: bool = True  # a multimodal model's projector (tower -> LM); false trains it


@dataclass
class ModelConfig:
    """Which pretrained model to fine-tune and how to load it."""

    # A local from_pretrained directory, or a Hugging Face Hub id ("Qwen/Qwen3-0.6B") resolved
    # through the standard HF cache (HF_HOME / HF_HUB_CACHE; downloaded unless HF_HUB_OFFLINE=1).
    path: str = ""
    revision: str = ""  # Hub ids: a branch, tag or commit ("" = main)
    trust_remote_code: bool = False  # never run a model repo's own Python unless asked
    # "auto": varlen on CUDA with packed rows, else sdpa (eager for a family without it, e.g.
    # GPT-OSS on CPU; FlexAttention there on CUDA) — docs/gpu-path.md; or one of "varlen"
    # (flash varlen on packed rows' segments), "sdpa", "eager", "flash_attention_2",
    # "flex_attention"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = (
        False  # recompute activations in backward: less memory, ~30% slower
    )
    # torch.compile: "regional" = each decoder layer, true = the whole model, false = off;
    # "auto" = regional on CUDA where the GPU check measured it helps, else off (dsft/fastpath.py)
    compile: bool | Literal["auto", "regional"] = "auto"
    # Fused kernels patched into the model before loading: "liger" = Liger Kernel's
    # RMSNorm, RoPE and SwiGLU (CUDA, `pip install dsft[gpu]`); "none" = transformers' own;
    # "auto" = liger on CUDA where measured to help and installed, else none (docs/gpu-path.md)
    kernels: Literal["auto", "none", "liger"] = "auto"
    # Long sequences: run each block's MLP over tiles of the sequence and recompute them in
    # backward, so its wide intermediate activations never exist for the whole sequence
    # (DeepSpeed's ALST tiled compute; about one extra MLP forward of time).
    tiled_mlp: bool = False
    # QLoRA: "nf4" loads the frozen base in 4-bit NF4 through bitsandbytes (bf16 compute) with
    # LoRA on top. CUDA only; needs model.lora.enabled; exports the adapter only.
    quantization: Literal["none", "nf4"] = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    # Files: .jsonl, .json, .parquet, .csv, a datasets.save_to_disk directory, or a Hub
    # dataset id with optional query: "org/name?config=c&split=train&revision=v1".
    path: list[str] = field(default_factory=list)
    # Sampling weight of each path's training examples (one per path; 2.0 = every example
    # twice per epoch, 0.5 = a seeded half). Empty = 1.0 each. Val/test are never reweighted.
    weights: list[float] = field(default_factory=list)
    # Draw training samples from the paths in these proportions over the whole run (one
    # per path, normalised; e.g. [0.7, 0.3]): seeded, exact on resume, counts per source
    # in the metrics and summary. An epoch stays len(train) samples; a source that runs
    # out starts over in a new order. Instead of `weights`. Empty = off.
    mix: list[float] = field(default_factory=list)
    format: Literal["auto", "instruction", "chat", "sharegpt", "prompt_completion", "text"] = "auto"
    # Your column name for a canonical one, e.g. {instruction: question, output: answer};
    # canonical names: instruction input output messages role content conversations
    # from value prompt completion text.
    columns: dict[str, str] = field(default_factory=dict)
    # Chat template: "" = the tokenizer's own; "chatml", "llama3", "alpaca" = built-in;
    # else a path to a .jinja file or the Jinja text itself.
    template: str = ""
    # Which tokens carry loss: every assistant turn, only the last one, or all tokens
    # (prompts too). Raw `text` examples always train on all tokens.
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    # Multi-turn chats: "as_rendered" trains each as the template renders the whole of it
    # (history-rewriting templates, e.g. Qwen3 / GPT-OSS, drop earlier turns' reasoning);
    # "per_turn" makes one example per assistant turn, its context exactly as at inference;
    # "last_turn" trains only the final assistant turn (docs/moe.md).
    multi_turn: Literal["as_rendered", "per_turn", "last_turn"] = "as_rendered"
    # Strings that end an assistant turn and are trained with it (e.g. ["<|im_end|>"]);
    # empty = the special tokens the template writes after an assistant turn, plus EOS.
    turn_end: list[str] = field(default_factory=list)
    # Fold a system message into the first user turn (templates without a system role).
    fold_system: bool = False
    # Reasoning (reasoning_content / thinking / inline <think>) of assistant turns: "train"
    # it as the template renders it, or "drop" it from the conversation before rendering.
    reasoning: Literal["train", "drop"] = "train"
    # Extra chat-template variables, e.g. {enable_thinking: false, date_string: "26 Jul 2024"}.
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    template_date: str = ""  # YYYY-MM-DD returned by the template's strftime_now; "" = today
    max_len: int = 1024  # tokens per example
    # Longer examples: "truncate" keeps the first max_len tokens, "drop" leaves them out.
    truncation: Literal["truncate", "drop"] = "truncate"
    # Pack several training examples into each max_len row (best-fit decreasing); attention
    # never crosses examples (position ids restart per example). train.micro_batch then
    # counts packed rows.
    packing: bool = False
    on_bad_row: Literal["error", "skip"] = "error"  # skip = count, report and leave it out
    max_line_mb: float = 1024.0  # a longer jsonl line is a located bad row (see on_bad_row)
    # Images larger than this many pixels are bad rows (decompression bombs far above it)
    max_image_pixels: int = 40_000_000
    # Explicit validation / test files; when given, no validation / test split is carved
    # from `path`.
    val_path: list[str] = field(default_factory=list)
    test_path: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    val_size: int = 0  # examples; when > 0 it replaces val_fraction
    test_size: int = 0  # examples; when > 0 it replaces test_fraction
    # k-fold cross-validation: the examples left after the test split are cut into kfold
    # folds; fold f is the validation split. fold=-1 makes `dsft train` run every fold.
    kfold: int = 0
    fold: int = -1
    split_seed: int = 0  # the split depends on this seed only, not on train.seed
    shuffle: bool = True
    # Tokenised data is cached, keyed by file contents + tokenizer + template + settings.
    cache: bool = True
    cache_dir: str = ""  # default: $DSFT_CACHE or ~/.cache/dsft
    # Processes that tokenise (each node's local rank 0 forks them); 0 = the node's usable
    # cores (CPU affinity). The cache entry is the same bytes for any number of workers.
    workers: int = 0
    # Seconds a rank waits for another rank or node to finish tokenising before it stops
    # with a message naming who holds the work; 0 = wait for ever.
    wait_timeout: float = 7200.0


@dataclass
class TrainConfig:
    """Optimisation: batch sizes, schedule, precision."""

    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` full epochs
    # Sequences per rank per forward pass; "auto": the largest the memory planner fits
    # (needs global_batch, which accumulation then reaches).
    micro_batch: int | Literal["auto"] = 4
    grad_accum: int = 1  # micro-batches per optimizer step; ignored when global_batch is set
    global_batch: int = 0  # sequences per optimizer step over all ranks; 0 = derived
    lr: float = 2e-5
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0  # never applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Layer-wise LR decay: block i of L gets lr * layer_decay ** (L - i), the embeddings
    # lr * layer_decay ** (L + 1), the head and final norm lr. 1.0 = off.
    layer_decay: float = 1.0
    # Regex on parameter names -> LR multiplier (first match wins), on top of layer_decay,
    # e.g. {"embed_tokens": 0.1}.
    lr_scale: dict[str, float] = field(default_factory=dict)
    max_grad_norm: float = 1.0  # 0 disables clipping
    # Consecutive steps with a non-finite loss or gradient norm (each skipped) before the
    # run stops; 0 = never stop. fp16 loss-scale overflows are skipped but not counted.
    max_bad_steps: int = 5
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 42
    # Loss from the final hidden states of the target positions only, through the LM head
    # in gradient-checkpointed chunks: no [batch, seq, vocab] logits (dsft/loss.py).
    # false = the model's full logits, then cross-entropy (the older, hungrier path).
    # train.objective=dpo: the scored tokens' log-probs in chunks (dsft.loss.chunked_logps).
    fused_loss: bool = True
    # Sequence parallelism (Ulysses): each sequence / packed row is split across this many
    # ranks, attention exchanges heads for sequence (all-to-all); data-parallel size =
    # ranks / sequence_parallel. Needs heads, KV heads and data.max_len divisible by it.
    # "auto": the memory planner picks the smallest that fits (1 without CUDA).
    sequence_parallel: int | Literal["auto"] = 1
    # Mixture of experts: the router load-balancing loss's weight; null = the model's own
    # router_aux_loss_coef, 0 = off (docs/moe.md).
    router_aux_loss_coef: float | None = None
    # What the loop optimises: "sft" (next-token loss on responses) or "dpo" (preference
    # tuning on chosen/rejected pairs, or KTO's labelled completions; see `preference`).
    objective: Literal["sft", "dpo"] = "sft"


@dataclass
class PreferenceConfig:
    """Preference tuning (train.objective=dpo): the loss and its reference (docs/preference.md)."""

    # sigmoid (DPO), ipo, hinge, robust (noise-robust DPO), orpo, simpo (both reference-free),
    # kto (unpaired prompt/completion/label rows).
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "orpo", "simpo", "kto"] = "sigmoid"
    beta: float = 0.1  # DPO's temperature; ORPO's lambda is `orpo_lambda`, SimPO's beta is this
    # sigmoid: conservative DPO (cDPO) label smoothing; robust: the assumed flip rate (< 0.5).
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO's target reward margin (TRL CPOConfig's default)
    orpo_lambda: float = 0.1  # weight of ORPO's odds-ratio term (TRL ORPOConfig's beta)
    # Weight of an added NLL on the chosen responses (RPO; CPO's cpo_alpha for simpo);
    # 0 = none. ORPO always adds its NLL.
    rpo_alpha: float = 0.0
    kto_desirable_weight: float = 1.0  # KTO: weight of desirable examples' losses
    kto_undesirable_weight: float = 1.0  # KTO: weight of undesirable examples' losses
    # Reference log-probs: "precomputed" = one pass before training with the same engine
    # (LoRA adapter off, or the initial weights), cached beside the token cache; "live" =
    # a second frozen copy of the model computes them every step; "none" = reference-free
    # (orpo and simpo need none and ignore this).
    reference: Literal["precomputed", "live", "none"] = "precomputed"


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed shards the model states. The JSON is generated from this."""

    # 0-3, or "auto": the memory planner (dsft/planner/) picks stage and offload from the
    # model's size and the GPUs' free memory; without CUDA, ZeRO-0 on one rank, ZeRO-2 on more.
    zero_stage: int | Literal["auto"] = "auto"
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer states in host RAM (auto: required)
    offload_params: bool = False  # ZeRO 3: parameters in host RAM (auto: required)
    loss_scale_window: int = 1000  # fp16 dynamic loss scaling
    initial_scale_power: int = 16
    min_loss_scale: float = 1.0


@dataclass
class BenchmarksConfig:
    """lm-evaluation-harness tasks on the base model and on the trained one (pip install
    'dsft[eval]'): a table of base, fine-tuned and delta in the summary, report and card."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task names; [] = off
    limit: float = 0  # documents per task (a fraction of them when < 1); 0 = all
    num_fewshot: int = -1  # few-shot examples; -1 = each task's own default
    batch_size: int = 8  # requests per forward pass / generate call
    apply_chat_template: Literal["auto", "on", "off"] = "auto"  # auto: when the model has one
    include_path: str = ""  # a folder of your own lm-eval YAML tasks
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when installed on a GPU
    max_new_tokens: int = 0  # generate_until tasks: cap on generated tokens; 0 = the task's
    # A fine-tuned score this far (absolute) below the base one is flagged as forgetting.
    max_drop: float = 0.02


@dataclass
class EvalConfig:
    """Validation during training, generation metrics, early stopping."""

    every: int = 0  # optimizer steps between validations; 0 = only at the end
    before_training: bool = True  # a step-0 validation gives the "before" numbers
    micro_batch: int = 8
    generate: bool = True  # generation metrics (exact match, F1) on the test split at the end
    max_generate: int = 200  # examples to generate for (0 = all)
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default; sampling uses temperature / top_p
    temperature: float = 1.0
    top_p: float = 1.0
    # Accuracy and macro-F1 over the label set: "auto" when references look like labels
    # (at most 20 distinct values, each at least twice), "on", or "off".
    label_metrics: Literal["auto", "on", "off"] = "auto"
    # Early stopping and best model: the validation metric to watch. val/exact_match and
    # val/f1 generate on the validation split at every evaluation (up to max_generate).
    # With train.objective=dpo also val/rewards/accuracy and val/rewards/margin.
    metric: Literal[
        "val/loss",
        "val/ppl",
        "val/token_acc",
        "val/exact_match",
        "val/f1",
        "val/rewards/accuracy",
        "val/rewards/margin",
    ] = "val/loss"
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop
    min_delta: float = 0.0  # the smallest change that counts as an improvement
    save_best: bool = True  # export the best model to <output_dir>/best (needs eval.every)
    benchmarks: BenchmarksConfig = field(default_factory=BenchmarksConfig)


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints of the run and the exported Hugging Face model."""

    every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    save_final: bool = True
    keep_last: int = 2  # newest checkpoints kept; 0 = keep all
    resume: bool = True  # continue from <output_dir>/checkpoints/latest when it exists
    resume_from: str = ""  # or from this checkpoint (checkpoints/step_N, or a run directory)
    export: bool = True  # write <output_dir>/final: a from_pretrained directory
    # On SIGTERM/SIGUSR1 the run saves and exits 75; under Slurm, on SIGUSR1 (the
    # warning before the time limit), also requeue the job (`scontrol requeue
    # $SLURM_JOB_ID`) so that it resumes by itself. SIGTERM (scancel) never requeues.
    requeue: bool = False
    # Also store frozen parameters (the LoRA base, model.freeze) in every checkpoint. Off:
    # a checkpoint holds the trained parameters, their optimizer states and the run state;
    # resume and export reload the frozen weights from model.path, after checking that its
    # weight files are the ones the run started from.
    save_frozen: bool = False
    # Unpickle checkpoint files that name Python globals outside DeepSpeed's allowlist
    # (--trust-checkpoint). Such a file can run code: only for checkpoints you made.
    trust: bool = False
    # Resume although settings that change the run's meaning (data, model, objective,
    # global batch, schedule, seed) differ from the checkpoint's (--allow-changes).
    allow_changes: bool = False
    # With resume=false: clear an output_dir that already holds a run (--overwrite).
    overwrite: bool = False


@dataclass
class LoggingConfig:
    """What rank 0 reports and where."""

    every: int = 10  # optimizer steps between train-loss log lines
    # Experiment trackers (rank 0; metrics.jsonl is always written): tensorboard
    # (<output_dir>/tensorboard), wandb (offline into <output_dir>/wandb unless WANDB_MODE or
    # WANDB_API_KEY say online), mlflow (MLFLOW_TRACKING_URI, else a file store in
    # <output_dir>/mlruns). One that is not installed or unreachable is a warning.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    project: str = "dsft"  # W&B project; MLflow experiment when no group is set
    run_name: str = ""  # "" = the output_dir's name
    group: str = ""  # W&B group / MLflow experiment; dsft sweep sets it for its trials
    progress: bool = True
    # Peak dense FLOP/s per GPU, in TFLOP/s, for MFU; 0 = look it up from the GPU's
    # name (bf16/fp16 dense numbers); without a known peak MFU is not logged.
    peak_tflops: float = 0.0
    # torch.profiler on rank 0 for this many optimizer steps (after 2 unprofiled ones):
    # <output_dir>/profile/top_kernels.md (the top kernels by time) and trace.json.gz.
    profile_steps: int = 0


@dataclass
class Config:
    """A complete dsft run."""

    output_dir: str = "runs/dsft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def validate(cfg: Config) -> list[str]:
    """Semantic checks that need several fields at once; returns every problem found."""
    p: list[str] = []
    t, d, ds, ev = cfg.train, cfg.data, cfg.deepspeed, cfg.eval
    if not cfg.model.path:
        p.append("model.path: required; a local from_pretrained directory or a Hub id (org/name)")
    elif is_hub_id(cfg.model.path):
        pass  # resolved through the Hub cache when the model loads
    elif not (Path(cfg.model.path) / "config.json").is_file():
        p.append(
            f"model.path: {cfg.model.path!r} has no config.json; point it at a directory "
            "written by save_pretrained"
        )
    p.extend(validate_data(d))
    for name in ("micro_batch", "grad_accum", "epochs"):
        if getattr(t, name) != "auto" and getattr(t, name) < 1:
            p.append(f"train.{name}: must be >= 1")
    if t.micro_batch == "auto" and t.global_batch <= 0:
        p.append("train.micro_batch=auto: needs train.global_batch (the batch to reach)")
    if t.max_steps < 0:
        p.append("train.max_steps: must be >= 0 (0 means: run train.epochs)")
    if cfg.logging.profile_steps < 0:
        p.append("logging.profile_steps: must be >= 0 (0 = no profile)")
    if t.global_batch < 0:
        p.append("train.global_batch: must be >= 0 (0 means micro_batch x grad_accum x ranks)")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        p.append(f"train.lr: {t.lr} must be a positive number")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append("train.min_lr_ratio: must be in [0, 1]")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append("train.warmup_ratio: must be in [0, 1)")
    if t.warmup_steps < 0:
        p.append("train.warmup_steps: must be >= 0")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        p.append(f"train.betas: {t.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if t.max_grad_norm < 0:
        p.append("train.max_grad_norm: must be >= 0 (0 disables clipping)")
    if ds.zero_stage not in (0, 1, 2, 3, "auto"):
        p.append(f"deepspeed.zero_stage: {ds.zero_stage} must be 0, 1, 2, 3 or auto")
    if ds.offload_optimizer and ds.zero_stage == 0:
        p.append("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1 (or auto)")
    if ds.offload_params and ds.zero_stage not in (3, "auto"):
        p.append("deepspeed.offload_params: needs deepspeed.zero_stage=3 (or auto)")
    if ev.every < 0 or ev.micro_batch < 1 or ev.max_generate < 0 or ev.max_new_tokens < 1:
        p.append("eval: every >= 0, micro_batch >= 1, max_generate >= 0, max_new_tokens >= 1")
    if ev.patience < 0 or ev.min_delta < 0:
        p.append("eval.patience and eval.min_delta must be >= 0")
    if ev.patience and not ev.every:
        p.append("eval.patience: early stopping needs periodic validation; set eval.every > 0")
    if ev.metric.startswith("val/rewards") and t.objective != "dpo":
        p.append(f"eval.metric={ev.metric}: needs train.objective=dpo")
    if ev.metric.startswith(("val/exact", "val/f1")) and not has_val_split(d):
        p.append(f"eval.metric={ev.metric} needs a validation split; set data.val_fraction > 0")
    if not (ev.temperature > 0 and 0 < ev.top_p <= 1):
        p.append("eval.temperature must be > 0 and eval.top_p in (0, 1]")
    p += validate_benchmarks(ev.benchmarks)
    if ev.benchmarks.tasks and not cfg.checkpoint.export and not (ev.save_best and ev.every):
        p.append(
            "eval.benchmarks: scores an export after training; set checkpoint.export=true "
            "(or eval.save_best with eval.every > 0)"
        )
    if cfg.logging.peak_tflops < 0:
        p.append("logging.peak_tflops: must be >= 0 (0 = look up the GPU)")
    if ev.generate and not has_test_split(d):
        p.append(
            "eval.generate: needs a test split; set data.test_fraction > 0 or eval.generate=false"
        )
    if not 0 < d.max_line_mb <= 1024:
        p.append(f"data.max_line_mb: {d.max_line_mb} must be in (0, 1024]")
    if not cfg.output_dir.strip():
        p.append("output_dir: required (a folder for checkpoints, logs and the export)")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        p.append("checkpoint.every and checkpoint.keep_last must be >= 0")
    if cfg.logging.every < 1:
        p.append("logging.every: must be >= 1")
    if not 0.0 < t.layer_decay <= 1.0:
        p.append(f"train.layer_decay: {t.layer_decay} must be in (0, 1]; 1.0 turns it off")
    for pattern, scale in t.lr_scale.items():
        p.extend(_regex_problem("train.lr_scale", pattern))
        if scale < 0:
            p.append(f"train.lr_scale.{pattern}: {scale} must be >= 0 (0 freezes in effect)")
    if t.max_bad_steps < 0:
        p.append("train.max_bad_steps: must be >= 0 (0 = never stop)")
    if t.router_aux_loss_coef is not None and t.router_aux_loss_coef < 0:
        p.append("train.router_aux_loss_coef: must be >= 0 (0 = off, null = the model's own)")
    fr = cfg.model.freeze
    for pattern in fr.patterns:
        p.extend(_regex_problem("model.freeze.patterns", pattern))
    if fr.bottom_layers < 0:
        p.append("model.freeze.bottom_layers: must be >= 0")
    if cfg.model.attn_implementation not in ATTENTION:
        p.append(
            f"model.attn_implementation: {cfg.model.attn_implementation!r} is not one of "
            f"{', '.join(ATTENTION)}"
        )
    p.extend(validate_sequence_parallel(cfg))
    p.extend(validate_preference(cfg))
    lora = cfg.model.lora
    if lora.enabled and (lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1):
        p.append("model.lora: r >= 1, alpha > 0 and dropout in [0, 1) are required")
    variants = [k for k in ("use_dora", "use_rslora") if getattr(lora, k)]
    variants += [f"init={lora.init}"] * (lora.init != "default")
    variants += [f"model.quantization={cfg.model.quantization}"] * (
        cfg.model.quantization != "none"
    )
    if variants and not lora.enabled:
        p.append(f"{', '.join(variants)}: LoRA variants need model.lora.enabled=true")
    if lora.init == "pissa" and cfg.model.quantization != "none":
        p.append("model.lora.init=pissa: not with a quantized base; use init=loftq for QLoRA")
    if cfg.model.quantization != "none" and ds.zero_stage == 3:
        p.append(
            "model.quantization: a 4-bit base cannot be partitioned by ZeRO-3; use "
            "deepspeed.zero_stage 0-2 (LoRA's optimizer states are small)"
        )
    if len(set(cfg.logging.report_to)) != len(cfg.logging.report_to):
        p.append(f"logging.report_to: {cfg.logging.report_to} names a tracker twice")
    return p


# model.attn_implementation: dsft's own ("auto", "varlen": dsft/attention.py), transformers'
ATTENTION = ("auto", "varlen", "eager", "sdpa", "flash_attention_2", "flex_attention")
COLUMNS = [
    "instruction",
    "input",
    "output",
    "messages",
    "role",
    "content",
    "conversations",
    "from",
    "value",
    "prompt",
    "completion",
    "text",
    "tools",
]
# A Hugging Face Hub repository id ("org/name"), for paths that are not local files.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(\?[^/]*)?$")


_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".gz", ".yaml", ".jinja")


def is_hub_id(path: str) -> bool:
    """``path`` names a Hub repository: org/name, not a local path, not a data file name."""
    repo = path.split("?")[0]
    return (
        bool(HUB_ID.match(path))
        and not repo.lower().endswith(_FILE_SUFFIXES)
        and not Path(repo).exists()
    )


def has_val_split(d: DataConfig) -> bool:
    return bool(d.val_path) or d.val_fraction > 0 or d.val_size > 0 or d.kfold > 1


def has_test_split(d: DataConfig) -> bool:
    return bool(d.test_path) or d.test_fraction > 0 or d.test_size > 0


def validate_benchmarks(b: BenchmarksConfig) -> list[str]:
    """eval.benchmarks: the lm-eval settings (task names are checked when lm-eval loads)."""
    p: list[str] = []
    if b.limit < 0:
        p.append(f"eval.benchmarks.limit: {b.limit} must be >= 0 (0 = every document)")
    if b.batch_size < 1:
        p.append(f"eval.benchmarks.batch_size: {b.batch_size} must be >= 1")
    if b.num_fewshot < -1:
        p.append(f"eval.benchmarks.num_fewshot: {b.num_fewshot} must be >= 0 (or -1: default)")
    if b.max_drop < 0:
        p.append(f"eval.benchmarks.max_drop: {b.max_drop} must be >= 0")
    if b.include_path and not Path(b.include_path).is_dir():
        p.append(f"eval.benchmarks.include_path: {b.include_path} is not a folder")
    if any(not t or "," in t for t in b.tasks):
        p.append("eval.benchmarks.tasks: a list of task names, e.g. [gsm8k, arc_easy]")
    if b.tasks and importlib.util.find_spec("lm_eval") is None:
        p.append("eval.benchmarks: needs lm-evaluation-harness: pip install 'dsft[eval]'")
    if b.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        p.append("eval.benchmarks.backend=vllm: vLLM is not installed (pip install vllm)")
    return p


def validate_data(d: DataConfig) -> list[str]:
    """Problems of the ``data`` section (files exist, fractions add up, options agree)."""
    p: list[str] = []
    if not d.path:
        p.append("data.path: required; give one or more .jsonl/.json/.parquet/.csv files")
    if d.multi_turn != "as_rendered" and d.loss_on != "assistant":
        p.append(
            f"data.multi_turn={d.multi_turn} trains one assistant turn per example; it needs "
            f"data.loss_on=assistant (got {d.loss_on})"
        )
    for key in ("path", "val_path", "test_path"):
        for f in getattr(d, key):
            if not Path(f).exists() and not is_hub_id(f):
                p.append(f"data.{key}: {f!r} not found")
    if d.mix:
        if len(d.mix) != len(d.path):
            p.append(
                f"data.mix: {len(d.mix)} proportions for {len(d.path)} paths; give one per path"
            )
        if any(w < 0 for w in d.mix) or not any(w > 0 for w in d.mix):
            p.append("data.mix: proportions must be >= 0 and at least one > 0")
        if d.weights:
            p.append(
                "data.mix and data.weights: use one (mix: proportions of the samples drawn; "
                "weights: repeat or subsample each file per epoch)"
            )
    if d.workers < 0:
        p.append(f"data.workers: {d.workers} must be >= 0 (0 = the node's usable cores)")
    if d.wait_timeout < 0:
        p.append(f"data.wait_timeout: {d.wait_timeout} must be >= 0 (0 = wait for ever)")
    if d.weights and len(d.weights) != len(d.path):
        p.append(
            f"data.weights: {len(d.weights)} weights for {len(d.path)} paths; give one per path"
        )
    if any(w < 0 for w in d.weights) or (d.weights and not any(w > 0 for w in d.weights)):
        p.append("data.weights: must be >= 0 and at least one > 0")
    for canon in d.columns:
        if canon not in COLUMNS:
            p.append(f"data.columns: {canon!r} is not a canonical field ({', '.join(COLUMNS)})")
    if d.template_date:
        try:
            datetime.strptime(d.template_date, "%Y-%m-%d")
        except ValueError:
            p.append(f"data.template_date: {d.template_date!r} is not a YYYY-MM-DD date")
    try:
        json.dumps(d.template_kwargs)
    except (TypeError, ValueError):
        p.append(
            "data.template_kwargs: values must be strings, numbers, booleans, lists or mappings "
            "(quote dates: date_string: '26 Jul 2024')"
        )
    if any(not e for e in d.turn_end):
        p.append("data.turn_end: empty strings cannot end a turn")
    if d.max_len < 8:
        p.append(f"data.max_len: {d.max_len} is too small; use at least 8 tokens")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(d, name)
        if not 0.0 <= v < 1.0:
            p.append(f"data.{name}: {v} must be in [0, 1)")
    if d.val_size < 0 or d.test_size < 0:
        p.append("data.val_size and data.test_size: must be >= 0 (0 = use the fraction)")
    val = 0.0 if (d.val_path or d.kfold > 1 or d.val_size) else d.val_fraction
    test = 0.0 if (d.test_path or d.test_size) else d.test_fraction
    if val + test >= 1.0:
        p.append("data.val_fraction + data.test_fraction must leave examples for training (< 1)")
    if d.kfold == 1 or d.kfold < 0:
        p.append("data.kfold: use 0 (off) or at least 2 folds")
    if d.kfold > 1 and (d.val_path or d.val_size):
        p.append("data.kfold: the folds are the validation splits; drop data.val_path/val_size")
    if not -1 <= d.fold < max(d.kfold, 1):
        p.append(f"data.fold: {d.fold} must be -1 (every fold) or in [0, data.kfold)")
    if d.fold >= 0 and d.kfold < 2:
        p.append("data.fold: needs data.kfold >= 2")
    return p


# Attention implementations the Ulysses all-to-all wraps (dsft/sequence_parallel.py).
SP_ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


REFERENCE_FREE = ("orpo", "simpo")


def needs_reference(p: PreferenceConfig) -> bool:
    """Whether the preference loss compares with a reference model at all."""
    return p.loss_type not in REFERENCE_FREE and p.reference != "none"


def live_reference_copy(cfg: Config) -> bool:
    """Whether training holds a second, frozen copy of the weights: preference.reference=live
    for a full fine-tune (with LoRA the live reference is the model with its adapter off)."""
    return (
        cfg.train.objective == "dpo"
        and needs_reference(cfg.preference)
        and cfg.preference.reference == "live"
        and not cfg.model.lora.enabled
    )


def validate_preference(cfg: Config) -> list[str]:
    """Problems of the ``preference`` section (only read with train.objective=dpo)."""
    pr, p = cfg.preference, []
    if cfg.train.objective != "dpo":
        return p
    if not (pr.beta > 0 and math.isfinite(pr.beta)):
        p.append(f"preference.beta: {pr.beta} must be a positive number")
    if pr.loss_type == "robust" and not 0.0 <= pr.label_smoothing < 0.5:
        p.append("preference.label_smoothing: must be in [0, 0.5) for loss_type=robust")
    elif not 0.0 <= pr.label_smoothing < 1.0:
        p.append("preference.label_smoothing: must be in [0, 1)")
    for name in ("rpo_alpha", "orpo_lambda", "simpo_gamma"):
        if getattr(pr, name) < 0:
            p.append(f"preference.{name}: must be >= 0")
    if pr.kto_desirable_weight <= 0 or pr.kto_undesirable_weight <= 0:
        p.append("preference.kto_desirable_weight / kto_undesirable_weight: must be > 0")
    if pr.loss_type not in REFERENCE_FREE and pr.reference == "none":
        p.append(
            f"preference.reference=none: loss_type={pr.loss_type} needs a reference; use "
            "precomputed (default) or live, or a reference-free loss (orpo, simpo)"
        )
    if cfg.train.sequence_parallel != 1:
        p.append("train.objective=dpo: needs train.sequence_parallel=1 (not supported yet)")
    if cfg.train.micro_batch == "auto":
        p.append(
            "train.objective=dpo: set train.micro_batch (pairs per rank; the planner sizes "
            "single sequences, not pairs)"
        )
    if cfg.data.packing and pr.loss_type == "kto":
        p.append("data.packing: not with preference.loss_type=kto (unpaired rows)")
    return p


def validate_sequence_parallel(cfg: Config) -> list[str]:
    """``train.sequence_parallel`` against the data length, the attention and the model's
    head counts (read from its config.json: every rank must own whole heads)."""
    n = cfg.train.sequence_parallel
    if n == "auto" or n == 1:
        return []
    if n < 1:
        return ["train.sequence_parallel: must be >= 1 (1 = off) or auto"]
    p: list[str] = []
    if cfg.data.max_len % n:
        p.append(
            f"data.max_len: {cfg.data.max_len} is not divisible by train.sequence_parallel={n}; "
            f"use a multiple of {n}, e.g. {cfg.data.max_len // n * n or n}"
        )
    if cfg.model.attn_implementation not in SP_ATTENTION:
        p.append(
            f"train.sequence_parallel={n}: model.attn_implementation="
            f"{cfg.model.attn_implementation} is not supported with it; use one of "
            f"{', '.join(SP_ATTENTION)}"
        )
    heads = model_heads(cfg.model.path)
    for what, count in zip(("attention heads", "key/value heads"), heads, strict=True):
        if count and count % n:
            p.append(
                f"train.sequence_parallel={n}: the model's {count} {what} are not divisible by "
                f"{n} (each rank attends with whole heads); use a divisor of {count}"
            )
    return p


def model_heads(path: str) -> tuple[int, int]:
    """(attention heads, key/value heads) from a model directory's config.json; 0 = unknown."""
    import json

    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0, 0
    text = text_config(raw)
    heads = int(text.get("num_attention_heads") or 0)
    return heads, int(text.get("num_key_value_heads") or heads)


def _regex_problem(where: str, pattern: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as e:
        return [f"{where}: {pattern!r} is not a valid regular expression ({e})"]
    return []
