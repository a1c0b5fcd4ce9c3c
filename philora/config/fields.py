"""Every config field, its default and its meaning, in one place: the four sections of a config file.

A config is one YAML file with four sections. `peft_config` and `training_config` use the names of peft's
`LoraConfig` and transformers' `TrainingArguments`, so the dicts of the Phi-3 model card's sample_finetune.py
paste in and run. `load_config` reads the YAML, applies `--set` overrides and validates everything, raising one
`UserError` that lists every problem at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PACKAGED_CONFIGS = Path(__file__).parent.parent / "configs"
REPORTERS = ("none", "tensorboard", "wandb", "mlflow")  # training_config.report_to


def doc(default: Any, help: str, check: Callable[[Any], bool] | None = None, fix: str = "") -> Any:
    """A dataclass field with its documentation and, for values of the right type that cannot work, a `check`
    and the `fix` to tell the user; mutable defaults are copied per instance."""
    metadata = {"help": help, "check": check, "fix": fix}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelSection:
    name_or_path: str | None = doc(
        None,
        "null = the embedded default (SmolLM2-135M-Instruct re-laid as Phi-3); else a local dir or hub id",
    )
    revision: str | None = doc(None, "hub revision (branch, tag or commit) when name_or_path is a hub id")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc(
        "auto", "weights dtype; auto = bfloat16 where the GPU/CPU computes it natively, else float32"
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = doc(
        "sdpa", "attention kernel; flash_attention_2 needs a CUDA GPU and the flash-attn package"
    )
    trust_remote_code: bool = doc(
        False, "run the model's own Python code (auto_map): set by --trust-remote-code; true in a file is refused"
    )
    quantization: Literal["4bit", "8bit"] | None = doc(
        None, "load the base quantised with bitsandbytes for QLoRA: 4bit = NF4, double quant, computing in model.dtype"
    )
    adapter: str | None = doc(
        None,
        "start from this trained LoRA adapter (a philora run or adapter dir, or any PEFT adapter dir) and go on "
        "training it; its own LoRA settings (r, alpha, dropout, targets) replace peft_config's. With dpo, the "
        "adapter on the base is also the frozen reference",
    )


@dataclass
class DataSection:
    train: str | None = doc(
        None,
        "training data: a .jsonl/.json/.csv/.parquet file, a folder of them, a saved datasets dir, or a hub "
        "dataset id (owner/name or owner/name:split); null = the shipped sample dataset",
    )
    eval: str | float | None = doc(
        None,
        "held-out data (same kinds as train), or a fraction (0-0.5] of train; null = none (sample: its eval split)",
        check=lambda v: not isinstance(v, float) or 0 < v <= 0.5,
        fix="a held-out fraction must be in (0, 0.5]",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text"] = doc(
        "auto",
        "row format, auto = detected per source from the first row's keys: messages (OpenAI chat), sharegpt "
        "(conversations from/value), alpaca (instruction/input/output), prompt_completion, preference (prompt/"
        "chosen/rejected pairs, for dpo and orpo), text (no template)",
    )
    columns: dict[str, str] | None = doc(
        None,
        "your field names for philora's, e.g. {prompt: question, completion: answer}; also role, content, "
        "from, value inside messages",
    )
    max_length: int | None = doc(
        None,
        "longest tokenised conversation (or packed row) in tokens; null = auto: the p99 of the training samples' "
        "lengths rounded up to a multiple of 64, at most the model's context and 4096 (rows as long as the longest "
        "sample would cost every step memory and time for the 1% that need it; set a number to keep them whole)",
        check=lambda v: v is None or v >= 16,
        fix="use at least 16 tokens, or null to follow the data",
    )
    overlong: Literal["drop", "truncate", "split"] = doc(
        "truncate",
        "a conversation longer than max_length is dropped, truncated after the last answer that fits, or split "
        "at user turns into several (the system prompt repeated); every one is counted in the report. A preference "
        "pair is kept whole or dropped with drop, else each side is truncated (never split)",
    )
    packing: bool = doc(True, "pack conversations into rows of max_length; attention never crosses them")
    train_on: Literal["assistant", "last_assistant", "all"] = doc(
        "assistant", "which tokens carry loss: every assistant turn, only the last one, or the whole chat"
    )
    train_on_reasoning: bool = doc(
        True,
        "an assistant message's reasoning (its reasoning_content, or a <think> block opening its content) carries "
        "loss with the answer (true), or stays in the text without loss (false: the answer is learned given it)",
    )
    on_bad_row: Literal["error", "skip"] = doc(
        "error", "a malformed row stops the run (error) or is counted and skipped"
    )
    max_row_bytes: int | None = doc(
        None,
        "a row larger than this many bytes (its line in .jsonl or .csv, its text in a .json array, its strings in "
        "parquet or a dataset) is a bad row, rejected by its size before it is parsed or tokenised: one huge row "
        "costs minutes and gigabytes only to be cut to max_length; null = 1 MiB or 256 × max_length, the larger "
        "(room for overlong: split to make many samples of a long conversation)",
        check=lambda v: v is None or v >= 1,
        fix="use a positive number of bytes, or null for 1 MiB or 256 × max_length, the larger",
    )
    max_eval_samples: int | None = doc(
        None,
        "use at most this many eval conversations (null = all)",
        check=lambda v: v is None or v >= 1,
        fix="use >= 1, or null for all",
    )
    cache: bool = doc(True, "keep tokenised data under the cache dir, keyed by content and settings")
    num_proc: int | None = doc(
        None,
        "tokenising processes; null = all cores for 2000+ conversations",
        check=lambda v: v is None or v >= 1,
        fix="use >= 1, or null for all cores",
    )


@dataclass
class PeftSection:
    r: int = doc(16, "LoRA rank", check=lambda v: v >= 1, fix="use a rank >= 1 (8-64 is typical)")
    lora_alpha: float = doc(
        32,
        "LoRA scaling numerator: the update is scaled by lora_alpha / r",
        check=lambda v: v > 0,
        fix="use a positive value (often 2*r)",
    )
    lora_dropout: float = doc(
        0.05,
        "dropout on the LoRA input (0 takes a faster path)",
        check=lambda v: 0 <= v < 1,
        fix="use a value in [0, 1)",
    )
    bias: Literal["none", "all", "lora_only"] = doc("none", "which biases are trained")
    task_type: Literal["CAUSAL_LM"] = doc("CAUSAL_LM", "peft task type; philora trains causal LMs")
    target_modules: str | list[str] = doc(
        "all-linear",
        "modules that get LoRA: a preset (all-linear = every linear layer but the LM head; attention; mlp;"
        " qv = q and v only) or a list of module names, where qkv_proj:q,v or gate_up_proj:up adapts only those"
        " slices of Phi-3's fused projections; a name that matches nothing is an error",
        check=lambda v: v in ("all-linear", "attention", "mlp", "qv") or (isinstance(v, list) and len(v) > 0),
        fix="use all-linear, attention, mlp, qv or a non-empty list of module names",
    )
    modules_to_save: list[str] | None = doc(None, "modules trained in full and saved with the adapter")
    use_rslora: bool = doc(False, "rank-stabilised LoRA: scale by lora_alpha / sqrt(r)")
    use_dora: bool = doc(False, "DoRA: a trained magnitude per output row on top of LoRA's direction update")
    init_lora_weights: bool | str = doc(
        True,
        "true = A random, B zero; gaussian; pissa (or pissa_niter_N) and olora start from the weights' principal"
        " directions (the adapter is saved converted, so it applies to the original base)",
        check=lambda v: v in (True, False, "gaussian", "pissa", "olora") or str(v).startswith("pissa_niter_"),
        fix="use true, false, gaussian, pissa, pissa_niter_N or olora",
    )
    layers_to_transform: list[int] | None = doc(None, "only these layer indices get LoRA (null = all)")


@dataclass
class TrainingSection:
    method: Literal["sft", "dpo", "orpo"] = doc(
        "sft",
        "sft = cross-entropy on the answers; dpo = direct preference optimisation against a frozen reference "
        "(the model as training starts); orpo = reference-free odds-ratio preference loss plus NLL on the chosen "
        "answers. dpo and orpo train on preference data (prompt, chosen, rejected)",
    )
    beta: float = doc(
        0.1,
        "dpo: the strength of the pull towards the reference (TRL's beta); orpo: the weight of the odds-ratio term "
        "(the paper's lambda, TRL's beta)",
        check=lambda v: v > 0,
        fix="use a positive value (0.1 is usual)",
    )
    loss_type: str | list[str] = doc(
        "sigmoid",
        "dpo's loss, as TRL names them: sigmoid (the DPO paper), hinge (SLiC), ipo (IPO, on per-token average "
        "log-ratios), sft (NLL of the chosen answers); a list adds several, weighted by loss_weights "
        "([sigmoid, sft] is RPO, which keeps the chosen answers likely)",
        check=lambda v: bool(v) and set([v] if isinstance(v, str) else v) <= {"sigmoid", "hinge", "ipo", "sft"},
        fix="use sigmoid, hinge, ipo, sft, or a list of them",
    )
    loss_weights: list[float] | None = doc(
        None,
        "dpo: the weight of each loss_type in the list (null = 1 each)",
        check=lambda v: v is None or len(v) > 0,
        fix="give one weight per loss_type, or null",
    )
    output_dir: str = doc("out", "where adapter/, checkpoints/, metrics.jsonl, run.json and loss.png go")
    overwrite_output_dir: bool = doc(False, "allow writing over a finished run in output_dir")
    seed: int = doc(42, "seed for LoRA init, data order and dropout")
    num_train_epochs: float = doc(
        3.0,
        "passes over the training data (fractions allowed); 3 as in transformers' TrainingArguments: one pass over a "
        "small dataset of your own rarely teaches a format, many more memorise it",
        check=lambda v: v > 0,
        fix="use a positive value",
    )
    max_steps: int = doc(
        -1,
        "optimizer steps to run; -1 = derive from num_train_epochs",
        check=lambda v: v == -1 or v >= 1,
        fix="use -1 (derive from epochs) or >= 1",
    )
    per_device_train_batch_size: int = doc(4, "rows per micro-batch", check=lambda v: v >= 1, fix="use a value >= 1")
    per_device_eval_batch_size: int = doc(4, "rows per eval batch", check=lambda v: v >= 1, fix="use a value >= 1")
    gradient_accumulation_steps: int = doc(
        1, "micro-batches per optimizer step (loss averaged per token)", check=lambda v: v >= 1, fix="use a value >= 1"
    )
    learning_rate: float = doc(2e-4, "peak learning rate (AdamW)", check=lambda v: v > 0, fix="use a positive value")
    weight_decay: float = doc(0.0, "AdamW weight decay", check=lambda v: v >= 0, fix="use a value >= 0")
    adam_beta1: float = doc(0.9, "AdamW beta1", check=lambda v: 0 <= v < 1, fix="use a value in [0, 1)")
    adam_beta2: float = doc(0.999, "AdamW beta2", check=lambda v: 0 <= v < 1, fix="use a value in [0, 1)")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon")
    optim: Literal["adamw_torch", "adamw_torch_fused"] = doc("adamw_torch", "optimizer")
    max_grad_norm: float = doc(
        1.0,
        "clip the gradient norm to this (0 = no clipping)",
        check=lambda v: v >= 0,
        fix="use >= 0 (0 = no clipping)",
    )
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
    ] = doc("linear", "learning-rate schedule after warmup")
    warmup_ratio: float = doc(
        0.0,
        "fraction of the steps spent warming up (used when warmup_steps is 0)",
        check=lambda v: 0 <= v <= 1,
        fix="use a value in [0, 1]",
    )
    warmup_steps: int = doc(
        0, "warmup steps; overrides warmup_ratio when > 0", check=lambda v: v >= 0, fix="use a value >= 0"
    )
    bf16: bool = doc(False, "compute in bfloat16 (autocast) where the hardware supports it")
    fp16: bool = doc(False, "compute in float16 (autocast, loss scaling); CUDA only")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory (slower)")
    gradient_checkpointing_kwargs: dict[str, bool] | None = doc(
        None,
        "e.g. {use_reentrant: false}",
        check=lambda v: set(v or {}) <= {"use_reentrant"},
        fix="only use_reentrant is supported",
    )
    gradient_checkpointing_layers: float = doc(
        1.0,
        "with gradient_checkpointing, the fraction of decoder layers recomputed (evenly spaced): below 1 saves"
        " less memory and costs less time; 0.25 recomputes every fourth layer",
        check=lambda v: 0 < v <= 1,
        fix="use a fraction in (0, 1]",
    )
    logging_strategy: Literal["steps", "epoch", "no"] = doc("steps", "when to log training loss")
    logging_steps: int = doc(10, "log every this many optimizer steps", check=lambda v: v >= 1, fix="use a value >= 1")
    logging_first_step: bool = doc(False, "also log the first step")
    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] = doc(
        "passive", "verbosity of library logs (passive = leave as is)"
    )
    do_eval: bool | None = doc(
        None,
        "compute eval loss at the end (and per eval_strategy); null = auto: true when the run has eval data "
        "(data.eval, or the sample data's eval split) and no sft answers after training (which report it already)",
    )
    eval_strategy: Literal["no", "steps", "epoch"] = doc(
        "no",
        "when to evaluate during training: the eval loss, and with predict_with_generate the answers' scores "
        "(exact match, ROUGE-L, JSON, tool calls), logged as eval_* in metrics.jsonl and drawn in loss.png",
    )
    eval_steps: int | None = doc(
        None,
        "eval every this many steps (null = logging_steps)",
        check=lambda v: v is None or v >= 1,
        fix="use a value >= 1, or null for logging_steps",
    )
    eval_generate_samples: int | None = doc(
        None,
        "held-out prompts answered at each evaluation during training, the first N (null = all of them); the "
        "answers before and after training always cover all",
        check=lambda v: v is None or v >= 1,
        fix="use a value >= 1, or null for all the held-out prompts",
    )
    metric_for_best_model: str | None = doc(
        None,
        "the eval metric that picks the best step and that early stopping and the regression check watch, as "
        "logged (eval_exact_match, eval_rouge_l, eval_json_match, eval_loss, eval_rewards/accuracies ...; the eval_ "
        "may be left out); null = eval_exact_match when answers are scored during training, else eval_loss",
    )
    greater_is_better: bool | None = doc(
        None, "whether a larger metric_for_best_model is better; null = false for a loss or perplexity, else true"
    )
    load_best_model_at_end: bool = doc(
        False,
        "write the adapter of the best evaluation (per metric_for_best_model) as the run's adapter, not the last "
        "step's; needs eval_strategy steps or epoch",
    )
    early_stopping_patience: int | None = doc(
        None,
        "stop training after this many evaluations in a row without improving metric_for_best_model by more than "
        "early_stopping_threshold (null = never stop early); needs eval_strategy steps or epoch",
        check=lambda v: v is None or v >= 1,
        fix="use a value >= 1, or null to never stop early",
    )
    early_stopping_threshold: float = doc(
        0.0,
        "the least change of metric_for_best_model that counts as improving, for early stopping",
        check=lambda v: v >= 0,
        fix="use a value >= 0",
    )
    fail_on_regression: bool = doc(
        False,
        "exit 1 (after writing everything) when the trained model scores worse than the model it started from on "
        "metric_for_best_model; `philora train --fail-on-regression` sets it",
    )
    neftune_noise_alpha: float | None = doc(
        None,
        "NEFTune: uniform noise on the input embeddings while training (never in evaluation or in the saved "
        "adapter), scaled by alpha / sqrt(tokens of the sequence x hidden size); 5 is the paper's usual value",
        check=lambda v: v is None or v > 0,
        fix="use a positive value (5 is usual), or null for none",
    )
    save_strategy: Literal["no", "steps", "epoch"] = doc("steps", "when to write checkpoints")
    save_steps: int = doc(
        500, "checkpoint every this many optimizer steps", check=lambda v: v >= 1, fix="use a value >= 1"
    )
    save_total_limit: int | None = doc(
        None,
        "keep only the newest this many checkpoints (null = all)",
        check=lambda v: v is None or v >= 1,
        fix="use >= 1, or null to keep every checkpoint",
    )
    remove_unused_columns: bool = doc(
        True,
        "accepted for compatibility; philora always keeps only token columns",
        check=lambda v: v,
        fix="philora always keeps only the token columns; remove the key or set it to true",
    )
    predict_with_generate: bool | None = doc(
        None,
        "generate answers to the eval prompts before and after training and report exact match beside the base "
        "model's; null = auto: true when the run has eval data (data.eval, or the sample data's eval split)",
    )
    generation_max_length: int | None = doc(
        None,
        "new tokens per generated eval answer; null = auto: the longest reference answer of the eval data plus 16, "
        "rounded up to 16 (at most 1024): room to score a nearly right answer, no minutes of rambling past it",
        check=lambda v: v is None or v >= 1,
        fix="use a value >= 1, or null for the longest reference answer plus 16",
    )
    run_name: str | None = doc(None, "a name recorded in run.json (and the run's name in wandb/mlflow)")
    report_to: str | list[str] = doc(
        "none",
        "where metrics also go, besides metrics.jsonl: none, tensorboard, wandb, mlflow, or a list of them",
        check=lambda v: set([v] if isinstance(v, str) else v) <= set(REPORTERS),
        fix="use none, tensorboard, wandb, mlflow, or a list of them",
    )
    logging_dir: str | None = doc(None, "TensorBoard event files (null = OUTPUT/runs)")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "peft_config": PeftSection,
    "training_config": TrainingSection,
}

# Names peft / transformers know that philora does not act on (yet). Saying so beats "unknown key".
# (LoraConfig's own field names are added when needed: importing peft here would slow every import.)
NOT_HONOURED = {
    "training_config": {
        "torch_compile",
        "deepspeed",
        "fsdp",
        "push_to_hub",
        "dataloader_num_workers",
        "label_smoothing_factor",
        "resume_from_checkpoint",
        "eval_on_start",
        "tf32",
        "data_seed",
        "full_determinism",
        "use_cpu",
        "lr_scheduler_kwargs",
        "auto_find_batch_size",
        "include_num_input_tokens_seen",
        "disable_tqdm",
        "do_train",
        "do_predict",
        # TRL's DPOConfig / ORPOConfig (philora always precomputes dpo's reference log-probabilities)
        "label_smoothing",
        "rpo_alpha",
        "reference_free",
        "precompute_ref_log_probs",
        "max_prompt_length",
        "max_completion_length",
        "sync_ref_model",
        "f_divergence_type",
        "use_weighting",
        "ld_alpha",
    },
}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    peft_config: PeftSection = field(default_factory=PeftSection)
    training_config: TrainingSection = field(default_factory=TrainingSection)
    # "section.key" -> where its value came from: default, FILE:LINE, --set, a flag (--output), auto (...).
    # Not a setting: to_dict (run.json, a checkpoint's settings) leaves it out.
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def origin(self, key: str) -> str:
        return self.origins.get(key, "default")
