"""`philora check`: config, data, model (on the meta device), template and tokens, memory, and with --time a few
real steps; one report, exit 2 when anything must be fixed. `gate` is the part `philora train` runs first."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

from philora import data, hardware
from philora.config import Config
from philora.config.relative import missing_data
from philora.data import report as data_report
from philora.errors import UserError
from philora.model.load import load_tokenizer, model_source
from philora.preflight import architecture, memory, schedule, tokens
from philora.preflight.report import Report, size

# what slower_quantized's warning cites (bench/real_size.py, docs/benchmarks.md)
QLORA_CPU_MEASURE = "3.8B, 512-token steps, 2-core AMD EPYC: 114 s in 4-bit vs 67 s in fp32, 45 s vs 36 s in bf16"


def check(config: Config, measure: Callable[[Config, data.PreparedData, Report], None] | None = None,
          as_json: bool = False) -> int:  # fmt: skip
    """Print the report for `config`; 0 when all is clear, 2 when there is a problem to fix. `measure` (the
    training side's trial steps, for --time) adds its findings when nothing else is wrong."""
    if missing := missing_data(config):  # before the tokenizer loads: a mistyped path fails in a moment
        raise UserError(*missing)
    report = Report()
    report.add("config", "ok (every field checked)")
    tokenizer = load_tokenizer(config.model, say_pad=False)  # the report's tokens section says what pads
    tc = config.training_config
    prepared = data.prepare(config.data, tokenizer, tc.seed, tc.method, model_context(config))
    report.add("data", *data.resolved_lines(config, prepared))
    report.add("data", *data_report.describe(prepared, config.data, color=sys.stdout.isatty() and not as_json))
    report.facts["data"] = data_report.as_record(prepared, config.data)
    report.facts["data"]["max_length"] = {"value": config.data.max_length, "auto": prepared.length is not None,
                                          **(vars(prepared.length) if prepared.length is not None else {})}  # fmt: skip
    try:
        data.require_usable(prepared, config.data, config.training_config.method)
    except UserError as e:
        report.errors += e.problems
    inspect(config, prepared, report)
    if measure is not None and not report.errors:
        measure(config, prepared, report)
    print(report.json() if as_json else report.text())
    for line in report.problems():
        print(line, file=sys.stderr)
    return 2 if report.errors else 0


def model_context(config: Config) -> int | None:
    """The model's context in tokens (its config.json's max_position_embeddings): what data.max_length: null stays
    within."""
    return getattr(architecture.model_config(config), "max_position_embeddings", None)


def gate(config: Config, prepared: data.PreparedData) -> Report:
    """The checks `philora train` runs before loading the model; UserError with every problem found."""
    report = Report()
    try:
        inspect(config, prepared, report)
    except UserError:
        raise
    except Exception as e:  # a model the meta device cannot build must not stop a run that would work
        report.warnings.append(f"check: could not inspect the model without its weights ({type(e).__name__}: {e})")
    if report.errors:
        raise UserError(*report.errors)
    return report


def inspect(config: Config, prepared: data.PreparedData, report: Report) -> None:
    """Model, LoRA, template, tokens and memory: everything known before the first weight is loaded."""
    try:
        arch = architecture.build(config)
    except UserError as e:
        report.errors += e.problems
        return
    describe_model(config, arch, report)
    gen = tokens.generation_config(model_source(config.model), arch.model.config, config.model.revision)
    facts, errors, warnings = tokens.check_tokens(prepared, arch.vocab_size, gen)
    report.facts["tokens"] = facts
    report.errors += errors
    report.warnings += warnings
    rendered = facts["rendered"].replace("\n", "\\n")
    verdicts = "; ".join(f"{what}: {'yes' if ok else 'NO'}" for what, ok in facts["verdicts"].items())
    report.add("tokens", f"template renders: {rendered}",
               f"eos {facts['eos']}, pad {facts['pad']}, end-of-turn {facts['end_of_turn']}; {verdicts}",
               f"end-of-turn trained {facts['end_of_turn_trained']}; generation stops at "
               f"{facts['generation_stops_at']}")  # fmt: skip
    estimate = memory.estimate(config, arch)
    describe_memory(config, arch, estimate, report)
    slower_quantized(config, arch, estimate, report)
    if prepared.train.samples:
        schedule.describe(config, prepared, schedule.plan(config, prepared, arch.original_context), report)


def describe_model(config: Config, arch: architecture.Architecture, report: Report) -> None:
    dc = config.data
    context = f"context {arch.context}" + (f" (longrope past {arch.original_context})" if arch.original_context else "")
    adapted = ", ".join(f"{n} x{c}" for n, c in arch.adapted.items())
    share = 100 * arch.trainable / max(arch.total, 1)
    report.add("model",
               f"{arch.name}: {arch.parameters:,} parameters, {arch.layers} layers, {hardware.dtype_name(arch.dtype)} "
               f"on {hardware.device().type}{', embeddings tied to the head' if arch.tied_embeddings else ''}; "
               f"attention {arch.attention}",
               f"LoRA on {sum(arch.adapted.values())} modules ({adapted}): {arch.trainable:,} trainable "
               f"({share:.2f}%)",
               *([f"fused: {'; '.join(f'{k} {v}' for k, v in arch.fused.items())}"] if arch.fused else []),
               f"rope {arch.rope}, {context}; data.max_length {dc.max_length}")  # fmt: skip
    report.facts["model"] = {
        k: getattr(arch, k)
        for k in (
            "name",
            "parameters",
            "trainable",
            "adapted",
            "fused",
            "tied_embeddings",
            "rope",
            "context",
            "original_context",
            "attention",
            "layers",
        )
    } | {"dtype": hardware.dtype_name(arch.dtype)}
    if arch.context and dc.max_length > arch.context:
        report.errors.append(
            f"data.max_length: {dc.max_length} is beyond the model's context of {arch.context} tokens; "
            f"use at most {arch.context}"
        )
    elif arch.original_context and dc.max_length > arch.original_context:
        report.warnings.append(
            f"data.max_length: {dc.max_length} is past {arch.original_context}, where this longrope model switches to "
            "its long factors; samples longer than that train with them and never share a batch with short ones"
        )


def describe_memory(config: Config, arch: architecture.Architecture, estimate: memory.Estimate,
                    report: Report) -> None:  # fmt: skip
    tc = config.training_config
    where = f"{estimate.device}, {size(estimate.capacity)}, {size(estimate.available)} free"
    shape = (f"micro-batch {tc.per_device_train_batch_size} x {config.data.max_length} tokens, checkpointing "
             f"{'on' if tc.gradient_checkpointing else 'off'}")  # fmt: skip
    report.add("memory", f"estimated peak of one training step ({shape}) on {where}:",
               *[f"  {part:<22}{size(n):>12}" for part, n in estimate.parts.items()],
               f"  {'total':<22}{size(estimate.total):>12}")  # fmt: skip
    report.facts["memory"] = {"device": estimate.device, "capacity": estimate.capacity,
                              "available": estimate.available, "parts": estimate.parts,
                              "total": estimate.total}  # fmt: skip
    if estimate.capacity is None or estimate.total <= (estimate.available or estimate.capacity):
        return
    fixes = alternatives(config, arch, estimate)
    limit = estimate.available or estimate.capacity
    advice = "; ".join(f"{how} → {size(total)}{' (not enough alone)' if total > limit else ''}"
                       for how, total in sorted(fixes, key=lambda fix: fix[1] > limit))  # fmt: skip
    advice = advice or "use a smaller model or a larger device"
    if estimate.total > estimate.capacity:
        report.errors.append(
            f"memory: one step needs about {size(estimate.total)}, more than this device's {size(estimate.capacity)}; "
            + advice
        )
    else:
        report.warnings.append(
            f"memory: one step needs about {size(estimate.total)}, more than the {size(estimate.available)} free now; "
            + advice
        )


def slower_quantized(config: Config, arch: architecture.Architecture, estimate: memory.Estimate,
                     report: Report) -> None:  # fmt: skip
    """Warn when a quantized base trains on a CPU where the weights unquantized fit: there each use of a 4-bit or
    8-bit weight unpacks it first (forward, recomputation, backward), so every step pays for memory it need not."""
    quantization, limit = config.model.quantization, estimate.available or estimate.capacity
    if quantization is None or estimate.device != "cpu" or not limit:
        return
    plain = copy.deepcopy(config)
    plain.model.quantization = None
    total = memory.estimate(plain, arch).total
    if total <= limit:
        report.warnings.append(
            f"model.quantization: {quantization} on a CPU unpacks each weight at every use, so a step takes longer "
            f"than with the {hardware.dtype_name(arch.dtype)} weights, and those fit here ({size(total)} of "
            f"{size(limit)} free): set model.quantization: null to train faster ({QLORA_CPU_MEASURE})"
        )


def alternatives(config: Config, arch: architecture.Architecture, estimate: memory.Estimate) -> list[tuple[str, int]]:
    """Settings that lower the peak, each with the estimate it would give: the largest micro-batch that fits (the
    same tokens per optimizer step through more accumulation), checkpointing every layer, a 4-bit base, shorter
    rows; where none fits alone, the smallest micro-batch with each of the others."""
    tc, limit = config.training_config, estimate.available or estimate.capacity or 0
    Edit = tuple[str, dict[str, Any]]  # a config section and the values it takes

    def changed(*edits: Edit) -> int:
        new = copy.deepcopy(config)
        for section, values in edits:
            for key, value in values.items():
                setattr(getattr(new, section), key, value)
        return memory.estimate(new, arch).total

    found: list[tuple[str, int]] = []
    smaller: tuple[str, Edit] | None = None  # the micro-batch found, and its edit
    batch = tc.per_device_train_batch_size
    while batch > 1:
        batch //= 2
        accumulation = tc.gradient_accumulation_steps * tc.per_device_train_batch_size // batch
        edit = ("training_config", {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation})
        total = changed(edit)
        if total <= limit or batch == 1:
            smaller = (f"training_config.per_device_train_batch_size: {batch} with gradient_accumulation_steps: "
                       f"{accumulation}", edit)  # fmt: skip
            found.append((smaller[0], total))
            break
    others: list[tuple[str, Edit]] = []
    if not tc.gradient_checkpointing or tc.gradient_checkpointing_layers < 1:
        others.append(
            (
                "training_config.gradient_checkpointing: true (every layer)",
                ("training_config", {"gradient_checkpointing": True, "gradient_checkpointing_layers": 1.0}),
            )
        )
    if config.model.quantization is None:
        others.append(("model.quantization: 4bit", ("model", {"quantization": "4bit"})))
    half = config.data.max_length // 2
    others.append((f"data.max_length: {half} (longer samples handled per data.overlong)",
                   ("data", {"max_length": half})))  # fmt: skip
    found += [(how, changed(edit)) for how, edit in others]
    if smaller is not None and all(total > limit for _, total in found):
        together = [(f"{smaller[0]}, and {how}", changed(smaller[1], edit)) for how, edit in others]
        found += [(how, total) for how, total in together if total <= limit]
    return found
