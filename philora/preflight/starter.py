"""`philora init DATA`: a commented starter config for the user's own data on this machine.

Everything it writes is derived from the data, the model and the machine, and each value's comment says from what:
the format and column mapping detected, max_length from the data's lengths, the micro-batch from the memory estimate,
epochs from the dataset's size, the learning rate from the model's size, and evaluation on held-out data with answers
as long as the longest reference. `philora check` and `philora train` take the file as it is."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from philora import data
from philora.config import Config, DataSection, ModelSection, PeftSection, TrainingSection
from philora.data.batching import row_width
from philora.data.formats import Columns, column_names, detect
from philora.data.guess import guess_columns
from philora.data.lengths import answer_budget
from philora.data.sources import ROW_BYTES_FLOOR, read_source
from philora.errors import UserError
from philora.model.load import load_tokenizer, without_bitsandbytes
from philora.paths import names_hub_dataset
from philora.preflight import architecture, memory, schedule
from philora.preflight.report import size

MIN_STEPS_PER_EPOCH = 20  # fewer optimizer steps than this per pass and the schedule has little room to work
HOLD_OUT = 0.1  # of the training data, for evaluation, when no --eval is given and there is enough of it
HOLD_OUT_FROM = 100  # conversations; below this a tenth is too few to measure anything
SCORED_DURING = 40  # held-out prompts answered at each evaluation during training
MAX_EVAL = 100  # held-out conversations answered before and after training: enough to measure, quick on a CPU
REFERENCE_LR, REFERENCE_SIZE = 2e-4, 3.8e9  # the usual LoRA rate for a Phi-3-mini-sized model
PREFERENCE_SCALE = 5e-5 / 2e-3  # the demo-dpo preset's rate beside the sft demo's, on the same model


@dataclass
class Choice:
    """One value of the starter config and why it is what it is."""

    value: Any
    why: str = ""


@dataclass
class Starter:
    sections: dict[str, dict[str, Choice]] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)  # the header: what was read

    def set(self, key: str, value: Any, why: str = "") -> None:
        section, name = key.split(".")
        self.sections.setdefault(section, {})[name] = Choice(value, why)


def main(args: argparse.Namespace) -> int:
    target = Path(args.output) if args.output else Path(f"{Path(args.data).stem}.yaml")
    if target.exists() and not args.force:
        raise UserError(f"--output {target}: the file exists; pass --force to replace it, or name another file")
    for flag, spec in (("DATA", args.data), ("--eval", args.eval)):
        if spec is not None and not Path(spec).expanduser().exists() and not names_hub_dataset(spec):
            raise UserError(f"{flag} {spec}: no such file or folder (looked in {Path.cwd()}{os.sep})")
    with without_bitsandbytes():  # nothing is quantised here; its import only logs noise on some CPUs
        starter = derive(args.data, args.eval, args.base, args.trust_remote_code, target, " ".join(sys.argv[1:]))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(starter), encoding="utf-8")
    print(f"wrote {target}: " + "; ".join(starter.summary[-1:]))
    print("next:")
    print(f"  philora check --config {target} --time   # everything checked, and the run's time measured")
    print(f"  philora train --config {target}")
    return 0


def derive(train: str, eval: str | None, base: str | None, trust: bool, target: Path, command: str) -> Starter:
    """The starter config for this data, model and machine."""
    starter = Starter()
    fmt, mapping = detect_format(train)
    method = "dpo" if fmt == "preference" else "sft"
    folder = target.absolute().parent
    model = ModelSection(name_or_path=base, trust_remote_code=trust)
    config = Config(model, DataSection(train=_local(train), columns=mapping))
    config.training_config.method = method
    tokenizer = load_tokenizer(config.model, say_pad=False)
    if eval is not None:
        config.data.eval = _local(eval)
    prepared = data.prepare(config.data, tokenizer, config.training_config.seed, method)
    data.require_usable(prepared, config.data, method)
    conversations = len(prepared.train.conversations)
    if eval is None and conversations >= HOLD_OUT_FROM:
        config.data.eval = HOLD_OUT
        prepared = data.prepare(config.data, tokenizer, config.training_config.seed, method)
    conversations = len(prepared.train.conversations)  # what trains (a preference pair is one), held-out ones out
    arch = architecture.build(config)
    lengths = sorted(len(s.input_ids) for s in prepared.train.samples)
    tokens = sum(lengths)

    starter.summary.append(f"philora {command}")
    model_why = "a local dir or hub id" if base else "the embedded SmolLM2-135M-Instruct; put your base model here"
    starter.set("model.name_or_path", base, model_why)
    starter.set("model.dtype", "auto", "bfloat16 where this machine computes it natively, else float32")
    starter.set("data.train", _relative(train, folder), "relative paths are read from this file's folder")
    if isinstance(config.data.eval, float):
        starter.set("data.eval", HOLD_OUT, f"no --eval file: {HOLD_OUT:.0%} of the training data held out")
    elif config.data.eval is not None:
        starter.set("data.eval", _relative(config.data.eval, folder))
    starter.set("data.format", fmt, "detected from the columns")
    if mapping:
        starter.set("data.columns", mapping, "your columns for philora's fields")
    max_length = int(config.data.max_length)  # data.prepare resolved it from the data
    starter.set("data.max_length", max_length,
                f"p99 of your {len(lengths):,} samples' lengths is {data_percentile(lengths, 0.99)} tokens, the "
                f"longest {lengths[-1]}")  # fmt: skip
    evals = prepared.eval.conversations if prepared.eval is not None else []
    if len(evals) > MAX_EVAL:
        starter.set("data.max_eval_samples", MAX_EVAL, f"of {len(evals):,} held out: enough to measure, quick")
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        starter.set(f"peft_config.{key}", getattr(PeftSection(), key))
    tc = choose_training(config, arch, prepared, method, starter)
    if evals:
        budget, answer = answer_budget(prepared.eval.samples if prepared.eval else [])
        starter.set("training_config.predict_with_generate", True,
                    "answer the held-out prompts before and after training: exact match, ROUGE-L, JSON")  # fmt: skip
        starter.set("training_config.generation_max_length", budget,
                    f"the longest held-out answer is {answer} tokens")  # fmt: skip
        starter.set("training_config.per_device_eval_batch_size", 16)
    steps = schedule.plan(config, prepared, arch.original_context).steps
    if evals:
        choose_selection(starter, steps, min(len(evals), MAX_EVAL))
    starter.set("training_config.logging_steps", max(1, steps // 20))
    starter.set("training_config.save_steps", max(1, round(steps / tc.num_train_epochs)), "a checkpoint each epoch")
    starter.set("training_config.save_total_limit", 2)
    starter.set("training_config.output_dir", f"out/{Path(train).stem}", "relative to where you run philora")
    where = "held out" if isinstance(config.data.eval, float) else "in --eval"
    starter.summary.append(
        f"{conversations:,} {'preference pairs' if method == 'dpo' else 'conversations'} to train on ({fmt}"
        f"{', columns ' + _mapped(mapping) if mapping else ''}), {tokens:,} tokens"
    )
    starter.summary.append(f"{arch.name} with {arch.parameters / 1e6:,.0f}M parameters on {hardware_line()}")
    starter.summary.append(
        f"max_length {max_length}, {steps} steps ({tc.num_train_epochs:g} epochs) of up to "
        f"{tc.per_device_train_batch_size * tc.gradient_accumulation_steps * row_width(method, max_length):,} tokens, "
        + (f"evaluated on {min(len(evals), MAX_EVAL)} conversations {where}" if evals else "no evaluation")
    )
    return starter


def choose_selection(starter: Starter, steps: int, answered: int) -> None:
    """Four evaluations during training, scoring answers, and the best one's adapter kept."""
    every = max(1, steps // 4)
    starter.set("training_config.eval_strategy", "steps", "evaluate during training, scoring answers as at the end")
    starter.set("training_config.eval_steps", every, f"4 evaluations in the {steps} steps")
    if answered > SCORED_DURING:
        starter.set("training_config.eval_generate_samples", SCORED_DURING,
                    f"the first {SCORED_DURING} of the {answered} held-out prompts at each evaluation during "
                    "training: enough to rank them, quicker")  # fmt: skip
    starter.set("training_config.load_best_model_at_end", True,
                "the adapter written is the best evaluation's (exact match), not the last step's")  # fmt: skip


def choose_training(config: Config, arch: architecture.Architecture, prepared: data.PreparedData, method: str,
                    starter: Starter) -> TrainingSection:  # fmt: skip
    """Epochs by the dataset's size, the micro-batch from the memory estimate and the data's size, the learning
    rate by the model's size; set on `config` and written to `starter`."""
    tc = config.training_config
    conversations = len(prepared.train.conversations)
    tc.num_train_epochs = 3.0 if conversations < 1000 else 2.0 if conversations < 10000 else 1.0
    what = "preference pairs" if method == "dpo" else "conversations"
    starter.set("training_config.method", method, what)
    starter.set("training_config.num_train_epochs", int(tc.num_train_epochs),
                f"{conversations:,} {what}: small data needs a few passes, large data one")  # fmt: skip
    rows = rows_per_epoch(config, prepared, arch)  # packed rows, or pairs: what a micro-batch holds
    fits = False
    for batch in (8, 4, 2, 1):
        tc.per_device_train_batch_size = batch
        estimate = memory.estimate(config, arch)
        fits = estimate.total <= 0.9 * (estimate.available or estimate.capacity or estimate.total)
        if fits and (rows / batch >= MIN_STEPS_PER_EPOCH or batch == 1):
            break
    if not fits:
        tc.gradient_checkpointing = True
        estimate = memory.estimate(config, arch)
        starter.set("training_config.gradient_checkpointing", True, "one row does not fit without it")
    free = estimate.available or estimate.capacity or 0
    starter.set("training_config.per_device_train_batch_size", tc.per_device_train_batch_size,
                f"{rows:,} rows an epoch; one step needs about {size(estimate.total)} of the {size(free)} free "
                f"({estimate.device})")  # fmt: skip
    if tc.per_device_train_batch_size < 4 and rows / 4 >= MIN_STEPS_PER_EPOCH:
        tc.gradient_accumulation_steps = 4 // tc.per_device_train_batch_size
        starter.set("training_config.gradient_accumulation_steps", tc.gradient_accumulation_steps,
                    "4 rows per optimizer step, through accumulation where memory allows fewer at once")  # fmt: skip
    tc.learning_rate = float(f"{learning_rate(arch.parameters, method):.1g}")
    why = f"{REFERENCE_LR:g} for a {REFERENCE_SIZE / 1e9:.1f}B model, scaled by the square root of the size ratio"
    if method != "sft":
        why += f"; {PREFERENCE_SCALE:g} of that for {method}, as demo-dpo beside the sft demo"
    starter.set("training_config.learning_rate", tc.learning_rate, why)
    tc.lr_scheduler_type, tc.warmup_ratio = "cosine", 0.05
    starter.set("training_config.lr_scheduler_type", "cosine")
    starter.set("training_config.warmup_ratio", 0.05)
    starter.set("training_config.seed", 0)
    return tc


def rows_per_epoch(config: Config, prepared: data.PreparedData, arch: architecture.Architecture) -> int:
    """The rows of one epoch as training packs them, one a micro-batch: samples packed into rows for sft, pairs for
    preference methods (from the plan training makes, as the check's)."""
    single = copy.deepcopy(config)
    single.training_config.per_device_train_batch_size = single.training_config.gradient_accumulation_steps = 1
    return round(schedule.plan(single, prepared, arch.original_context).steps_per_epoch)


def hardware_line() -> str:
    """This machine, as the estimates above depend on it."""
    import torch

    from philora import hardware

    dev = hardware.device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    arithmetic = "bf16" if hardware.cpu_has_fast_bf16() else "fp32"
    return f"a {os.cpu_count()}-core CPU computing in {arithmetic}"


def learning_rate(parameters: int, method: str = "sft") -> float:
    """LoRA's usual rate for a model of this size: smaller models take larger steps. Preference tuning starts from
    the model's own answers and moves them little: PREFERENCE_SCALE of it."""
    rate = min(2e-3, max(1e-4, REFERENCE_LR * math.sqrt(REFERENCE_SIZE / max(parameters, 1))))
    return rate * PREFERENCE_SCALE if method != "sft" else rate


def detect_format(spec: str) -> tuple[str, dict[str, str] | None]:
    """The format of the data's first file and, for a table with other column names, the mapping that reads it."""
    part = read_source(data.sample(spec), "train", ROW_BYTES_FLOOR).parts[0]
    try:
        return detect(part, Columns(None)), None
    except UserError:
        mapping = guess_columns(column_names(part))
        if not mapping:
            raise
    return detect(part, Columns(mapping)), mapping


def data_percentile(lengths: list[int], q: float) -> int:
    from philora.data.report import percentile

    return percentile(lengths, q)


def render(starter: Starter) -> str:
    """The starter config as YAML, each derived value with its reason as a comment."""
    lines = [f"# {line}" for line in starter.summary]
    lines.append("# Every value below was chosen for this data on this machine; `philora config --config THIS` shows")
    lines.append("# the rest (defaults), with where each value comes from.")
    for section in ("model", "data", "peft_config", "training_config"):
        lines.append(f"{section}:")
        for name, choice in starter.sections.get(section, {}).items():
            value = yaml.safe_dump(choice.value, default_flow_style=True, width=1000, sort_keys=False)
            value = value.strip().removesuffix("...")
            entry = f"  {name}: {value.strip()}"
            lines.append(f"{entry:<44}  # {choice.why}" if choice.why else entry)
    return "\n".join(lines) + "\n"


def _local(spec: str) -> str:
    """A path made absolute (this process may read it from elsewhere); a hub id as it is."""
    return os.path.abspath(spec) if Path(spec).expanduser().exists() else spec


def _relative(path: str, folder: Path) -> str:
    """A data path as the config file should say it: relative to its folder (a hub id as it is)."""
    if not Path(path).expanduser().exists():
        return path
    absolute = Path(os.path.abspath(path))
    try:
        return os.path.relpath(absolute, folder)
    except ValueError:  # another drive
        return str(absolute)


def _mapped(mapping: dict[str, str]) -> str:
    return ", ".join(f"{column} -> {name}" for name, column in mapping.items())
