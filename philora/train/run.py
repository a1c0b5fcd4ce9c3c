"""`philora train`: data and model in, a PEFT adapter and a record of the run out. One loop, read top to bottom."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from philora import data, hardware
from philora.config import Config, PeftSection, TrainingSection
from philora.data import report as data_report
from philora.data.batching import collate
from philora.errors import UserError
from philora.eval import report, runner, table
from philora.lora.targets import INIT_FROM_WEIGHTS, apply_lora
from philora.model.load import load_model, load_tokenizer, longrope_boundary, without_bitsandbytes
from philora.model.loss import TokenLoss
from philora.rundir import RunDir, plot_losses
from philora.train import checkpoint
from philora.train.distributed import backward_kwargs, configure, gathered_adapter, grad_norm, sharded
from philora.train.metrics import MetricsLog, reporters
from philora.train.plan import Plan, make_plan
from philora.train.record import write_run_record


class LossDiverged(UserError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""


@dataclass
class TrainResult:
    output_dir: Path
    model: Any  # the trained peft model, in memory
    evaluation: dict[str, Any] | None


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one unless asked to overwrite it."""
    existing = RunDir(out).written()
    if existing and not overwrite:
        raise UserError(
            f"--output {out}: already holds a run ({', '.join(p.name for p in existing)}); continue it with --resume, "
            "choose another --output, or set training_config.overwrite_output_dir: true"
        )
    for target in existing:
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def mixed_precision(tc: TrainingSection, dev: torch.device) -> str:
    if tc.fp16:
        if dev.type != "cuda":
            raise UserError("training_config.fp16: float16 autocast needs a CUDA GPU; use bf16 or neither here")
        return "fp16"
    if tc.bf16 and not hardware.bf16_is_fast(dev):
        print(
            "philora: training_config.bf16: this CPU has no native bf16 matmul (AMX/AVX512-BF16), where bf16 "
            "runs several times slower than fp32; computing in fp32",
            file=sys.stderr,
        )
        return "no"
    return "bf16" if tc.bf16 else "no"


def set_log_level(level: str) -> None:
    """transformers' verbosity per training_config.log_level; `passive` leaves it alone."""
    if level != "passive":
        import transformers

        transformers.logging.set_verbosity(getattr(transformers.logging, level.upper()))


def check_resume(out: Path, resume: str | bool | None, config: Config, clean: bool = True) -> Path | None:
    """The checkpoint to resume from (refusing one written with different settings), or None for a new run,
    whose output dir is prepared when `clean` (by the main process only, in a multi-process run)."""
    if not resume:
        if clean:
            prepare_output_dir(out, config.training_config.overwrite_output_dir)
        return None
    path = checkpoint.find_resume_point(out, resume)
    saved = json.loads((path / "state.json").read_text())
    if diffs := checkpoint.config_differences(saved["config"], config.to_dict()):
        raise UserError(*(f"--resume {path}: {d}; resume with the same settings" for d in diffs))
    return path


def checkpoint_layers(model: Any, tc: TrainingSection) -> None:
    """Recompute the activations of a fraction of the decoder layers in backward instead of keeping them: the
    memory of those layers' activations for about a third more of their compute. Evenly spaced layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # Non-reentrant checkpointing (torch's recommendation; it replays the RNG state, so dropout masks match).
    kwargs = {"use_reentrant": False, **(tc.gradient_checkpointing_kwargs or {})}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = round(len(layers) * tc.gradient_checkpointing_layers)
    chosen = {int(i * len(layers) / count) for i in range(count)} if count else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen


def make_optimizer(model: Any, tc: TrainingSection, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) parameters, and the warmup + decay schedule."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=tc.learning_rate,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_epsilon,
        weight_decay=tc.weight_decay,
        fused=tc.optim == "adamw_torch_fused" or None,
    )
    warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * total_steps)
    scheduler = get_scheduler(tc.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def train(config: Config, resume: str | bool | None = None) -> TrainResult:
    """Run a whole training job per `config`: data, model, LoRA, the loop, then adapter and records."""
    with without_bitsandbytes(config.model.quantization is None):
        return run_training(config, resume)


def run_training(config: Config, resume: str | bool | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.time()
    tc = config.training_config
    out = Path(tc.output_dir)
    dev = hardware.device()
    # Under `accelerate launch` or torchrun this is one of several processes; alone it is the only one.
    accelerator = Accelerator(mixed_precision=mixed_precision(tc, dev), cpu=dev.type == "cpu")
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # the main process prepares the output dir and data cache first
        resume_from = check_resume(out, resume, config, clean=main)
        set_log_level(tc.log_level)
        set_seed(tc.seed)
        log_dir = Path(tc.logging_dir) if tc.logging_dir else RunDir(out).tensorboard
        # Reporters before the slow parts, so a missing package fails early.
        sinks = reporters(tc.report_to, log_dir, tc.run_name, config.to_dict()) if main else []
        tokenizer = load_tokenizer(config.model)
        prepared = data.prepare(config.data, tokenizer, tc.seed)
    if main:
        for line in data_report.describe(prepared, config.data, color=sys.stderr.isatty()):
            print(f"philora: data: {line}", file=sys.stderr)
    data.require_usable(prepared, config.data)
    model = load_model(config.model, training=True)
    if tc.gradient_checkpointing:
        checkpoint_layers(model, tc)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "trained_tokens": 0, "train_seconds": 0.0, "window": None}
    prompts = runner.prompts_and_references(prepared.eval.conversations) if prepared.eval else []
    want_generations = tc.predict_with_generate and bool(prompts) and main
    if want_generations and resume_from is None:  # the base model, before any adapter touches it
        with accelerator.autocast():  # in the run's arithmetic, as every evaluation of the run
            state["answers_before"] = runner.answer(model, prepared.encoder, [p for p, _ in prompts],
                                                      tc.generation_max_length, tc.per_device_eval_batch_size,
                                                      "base model")  # fmt: skip
    model = apply_lora(model, config.peft_config, quantized=config.model.quantization is not None)
    initial = save_initial_adapter(model, out, config.peft_config) if main else None

    plan = make_plan(prepared.train.samples, tc, config.data.max_length, config.data.packing,
                     accelerator.num_processes, accelerator.process_index, longrope_boundary(model.config))  # fmt: skip
    optimizer, scheduler = make_optimizer(model, tc, plan.total_steps)
    configure(accelerator.state, tc)
    loss_fn, optimizer = accelerator.prepare(TokenLoss(model), optimizer)
    if resume_from is not None and sharded(accelerator):
        raise UserError(
            "--resume: resuming under FSDP or DeepSpeed is not supported yet (their optimizer state is sharded); "
            "resume with configs/accelerate/ddp.yaml or one process"
        )

    log = MetricsLog(RunDir(out).metrics if main else None, sinks)
    if resume_from is not None:
        saved = checkpoint.load(resume_from, model, optimizer, scheduler)
        state.update(saved["progress"])
        log.truncate_after(state["step"])
        if main:
            print(f"philora: resuming from {resume_from} at step {state['step']}/{plan.total_steps}", file=sys.stderr)
            warn_if_threads_differ(saved.get("torch_threads"))

    loop(config, plan, prepared, model, loss_fn, optimizer, scheduler, accelerator, log, state)
    weights = gathered_adapter(accelerator, loss_fn)
    accelerator.wait_for_everyone()
    if not main:
        return TrainResult(out, model, None)

    # PiSSA/OLoRA adapters are saved converted to plain LoRA on the original base weights.
    files = RunDir(out)
    model.save_pretrained(files.adapter, state_dict=weights, path_initial_model_for_weight_conversion=initial)
    tokenizer.save_pretrained(files.adapter)
    plot_losses(log.records, files.loss_plot)
    log.close()
    evaluation = None
    if want_generations:  # the same evaluation and files as `philora eval`, base answers from before training
        assert prepared.eval is not None
        with accelerator.autocast():
            evaluation = runner.evaluate_model(
            model,
            prepared.encoder,
            prepared.eval.samples,
            prompts,
            batch_size=tc.per_device_eval_batch_size,
            max_new_tokens=tc.generation_max_length,
            # PiSSA/OLoRA rewrote the base weights in memory: disabling the adapter would not give the base back
            base=not str(config.peft_config.init_lora_weights).startswith(INIT_FROM_WEIGHTS),
            base_answers=state["answers_before"],
            settings={"command": "train", "run": out.name, "adapter": str(files.adapter),
                      "base_model": config.model.name_or_path or "embedded",
                      "data": data.source_specs(config.data)[1] or f"{config.data.eval} of {config.data.train}",
                      "conversations": len(prepared.eval.conversations)},
            )  # fmt: skip
    write_run_record(out, config, prepared, model, state, log.records, evaluation, time.time() - started,
                     accelerator.num_processes, accelerator.mixed_precision)  # fmt: skip
    if evaluation is not None:
        report.write_results(out, evaluation, out)
        print(table.format_comparison(evaluation), file=sys.stderr)
    print(f"philora: done in {time.time() - started:.0f}s; adapter in {out / 'adapter'}", file=sys.stderr)
    return TrainResult(out, model, evaluation)


def warn_if_threads_differ(saved: int | None) -> None:
    """A CPU matmul may split its sums by thread, so a resumed run is bit-exact only with the same thread count."""
    now = torch.get_num_threads()
    if saved is not None and saved != now:
        print(
            f"philora: warning: resuming with {now} torch threads where the run had {saved}; the continuation may "
            f"differ from an uninterrupted run in the last bits. For a bit-exact resume set OMP_NUM_THREADS={saved}",
            file=sys.stderr,
        )


def save_initial_adapter(model: Any, out: Path, pc: PeftSection) -> str | None:
    """For initialisations that rewrite the base weights (PiSSA, OLoRA), the adapter as initialised, which peft
    needs to convert the trained one back onto the original base; None for the others."""
    if not str(pc.init_lora_weights).startswith(INIT_FROM_WEIGHTS):
        return None
    path = RunDir(out).lora_init
    lora_config = model.peft_config["default"]
    lora_config.init_lora_weights = True  # peft's convention for the saved starting point
    with warnings.catch_warnings():  # peft warns that PiSSA/OLoRA adapters need converting: this is for that
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
        model.save_pretrained(path)
    lora_config.init_lora_weights = pc.init_lora_weights
    return str(path)


def due(strategy: str, every: int, done: int, plan: Plan) -> bool:
    """Whether a steps/epoch/no strategy fires after optimizer step `done` (counted from 1)."""
    if strategy == "steps":
        return done % every == 0
    return strategy == "epoch" and plan.ends_epoch(done)


Batch = dict[str, torch.Tensor]


def optimizer_step(loss_fn: Any, batches: list[tuple[Batch, bool]], trained: int, accelerator: Any,
                   tc: TrainingSection, optimizer: Any, scheduler: Any) -> tuple[float, float | None]:  # fmt: skip
    """Forward/backward over this process's micro-batches, clip, step. Returns (summed loss over every process,
    grad norm). `trained` is the step's trained-token count over all processes; a batch flagged False is a
    lent row that only keeps this process in step with the others and adds nothing.

    Each micro-batch's summed loss is divided by the trained tokens of the whole step, so every token weighs the
    same however the step is split (a plain mean per micro-batch would over-weight short ones). Data-parallel
    wrappers average gradients over processes, so the loss is scaled by their number to make that a sum."""
    scale = accelerator.num_processes / max(trained, 1)
    total = torch.zeros((), device=accelerator.device)
    for i, (batch, counts) in enumerate(batches):
        # Gradients are synchronised once per step, after the last micro-batch, not after each one (DDP and FSDP
        # read no_sync; DeepSpeed's engine reads sync_gradients as its accumulation boundary).
        last = i == len(batches) - 1
        accelerator.sync_gradients = last
        with contextlib.nullcontext() if last else accelerator.no_sync(loss_fn):
            loss_sum, _ = loss_fn(**{k: v.to(accelerator.device) for k, v in batch.items()})
            loss_sum = loss_sum if counts else loss_sum * 0.0
            accelerator.backward(loss_sum * scale, **backward_kwargs(accelerator))
        total += loss_sum.detach()
    loss = float(accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total)
    norm = None
    if math.isfinite(loss):
        norm = grad_norm(accelerator, loss_fn, tc.max_grad_norm)
        optimizer.step()  # under DeepSpeed the engine stepped already (see philora.distributed)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


def loop(
    config: Config,
    plan: Plan,
    prepared: data.PreparedData,
    model: Any,
    loss_fn: Any,
    optimizer: Any,
    scheduler: Any,
    accelerator: Any,
    log: MetricsLog,
    state: dict[str, Any],
) -> None:
    """The optimizer steps from state['step'] to plan.total_steps, with logging, eval and checkpoints."""
    from tqdm.auto import tqdm

    tc, out = config.training_config, Path(config.training_config.output_dir)
    samples, pad_id = prepared.train.samples, prepared.encoder.tokenizer.pad_token_id
    eval_samples = prepared.eval.samples if prepared.eval else []
    # Sums since the last log line; part of the checkpoint so a resumed run logs the same values.
    window = state["window"] or {"loss": 0.0, "tokens": 0, "trained": 0, "seconds": 0.0}
    main = accelerator.is_main_process
    bar = tqdm(total=plan.total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=not main)  # fmt: skip
    loss_fn.train()
    while state["step"] < plan.total_steps:
        tick = time.perf_counter()
        step_rows = plan.micro_batches(state["step"])
        trained = sum(samples[i].trained for rows in step_rows for row in rows for i in row)
        tokens = sum(len(samples[i].input_ids) for rows in step_rows for row in rows for i in row)
        batches = [(collate(samples, plan.mine(rows), pad_id), plan.owns(rows)) for rows in step_rows]
        loss, grad_norm = optimizer_step(loss_fn, batches, trained, accelerator, tc, optimizer, scheduler)
        done = state["step"] + 1
        if not math.isfinite(loss):
            last = checkpoint.checkpoints(out)
            raise LossDiverged(
                f"training: the loss became {loss} at step {done}; lower training_config.learning_rate or check "
                "the data" + (f"; the last good checkpoint is {last[-1]}" if last else "")
            )
        seconds = time.perf_counter() - tick
        state.update(step=done, tokens=state["tokens"] + tokens, trained_tokens=state["trained_tokens"] + trained,
                     train_seconds=state["train_seconds"] + seconds)  # fmt: skip
        window = {"loss": window["loss"] + loss, "tokens": window["tokens"] + tokens,
                  "trained": window["trained"] + trained, "seconds": window["seconds"] + seconds}  # fmt: skip
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss / max(trained, 1):.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{window['tokens'] / window['seconds']:.0f}", refresh=False)  # fmt: skip

        last_step = done == plan.total_steps
        if tc.logging_strategy != "no" and (
            due(tc.logging_strategy, tc.logging_steps, done, plan) or last_step or (tc.logging_first_step and done == 1)
        ):
            log.write({"step": done, "epoch": round(plan.epochs_done(done), 4),
                       "loss": window["loss"] / max(window["trained"], 1), "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": window["tokens"] / window["seconds"], "tokens": state["tokens"],
                       "elapsed_s": round(state["train_seconds"], 2)})  # fmt: skip
            window = dict.fromkeys(window, 0)
        final_eval = last_step and (tc.do_eval or tc.eval_strategy != "no")
        if eval_samples and (due(tc.eval_strategy, tc.eval_steps or tc.logging_steps, done, plan) or final_eval):
            eval_loss = runner.eval_loss(loss_fn, eval_samples, tc.per_device_eval_batch_size, pad_id)
            log.write({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
            if main:
                bar.write(f"philora: step {done}: eval loss {eval_loss:.4f}")
                plot_losses(log.records, RunDir(out).loss_plot)
        if not last_step and due(tc.save_strategy, tc.save_steps, done, plan):
            weights = gathered_adapter(accelerator, loss_fn)  # every process takes part
            saved = {"step": done, "progress": {**state, "window": window}, "config": config.to_dict(),
                     "torch_threads": torch.get_num_threads()}  # fmt: skip
            if main:
                checkpoint.save(out, model, optimizer, scheduler, saved, tc.save_total_limit, weights)
    bar.close()
