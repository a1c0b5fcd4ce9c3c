"""The training loop: optimizer steps from where the run stands to the plan's end, with logging, evaluation and
checkpoints. What a checkpoint saves of the loop's position is `Progress`, a dataclass whose fields are the state."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

import torch

from philora.config import TrainingSection
from philora.errors import UserError
from philora.progress import Phase
from philora.rundir import plot_losses
from philora.train import checkpoint, evaluation
from philora.train.distributed import backward_kwargs, gathered_adapter, grad_norm
from philora.train.plan import Plan
from philora.train.selection import greater_is_better, patience_out, record, shown
from philora.train.state import Progress, Run, Window


class LossDiverged(UserError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""


def due(strategy: str, every: int, done: int, plan: Plan) -> bool:
    """Whether a steps/epoch/no strategy fires after optimizer step `done` (counted from 1)."""
    if strategy == "steps":
        return done % every == 0
    return strategy == "epoch" and plan.ends_epoch(done)


Batch = dict[str, torch.Tensor]


def optimizer_step(loss_fn: Any, batches: list[tuple[Batch, bool]], units: int, accelerator: Any,
                   tc: TrainingSection, optimizer: Any, scheduler: Any
                   ) -> tuple[float, float | None, dict[str, float]]:  # fmt: skip
    """Forward/backward over this process's micro-batches, clip, step. Returns (summed loss over every process,
    grad norm, summed statistics). `units` is the step's count of what the loss sums over (trained tokens, or
    pairs) over all processes; a batch flagged False is a lent row that only keeps this process in step with
    the others and adds nothing.

    Each micro-batch's summed loss is divided by the units of the whole step, so every token (or pair) weighs the
    same however the step is split (a plain mean per micro-batch would over-weight short ones). Data-parallel
    wrappers average gradients over processes, so the loss is scaled by their number to make that a sum."""
    scale = accelerator.num_processes / max(units, 1)
    total = torch.zeros((), device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    for i, (batch, counts) in enumerate(batches):
        # Gradients are synchronised once per step, after the last micro-batch, not after each one (DDP and FSDP
        # read no_sync; DeepSpeed's engine reads sync_gradients as its accumulation boundary).
        last = i == len(batches) - 1
        accelerator.sync_gradients = last
        with contextlib.nullcontext() if last else accelerator.no_sync(loss_fn):
            loss_sum, stats = loss_fn(**{k: v.to(accelerator.device) for k, v in batch.items()})
            loss_sum = loss_sum if counts else loss_sum * 0.0
            accelerator.backward(loss_sum * scale, **backward_kwargs(accelerator))
        total += loss_sum.detach()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + (value.detach() if counts else value.detach() * 0.0)
    if accelerator.num_processes > 1:
        total, sums = accelerator.reduce(total, "sum"), {k: accelerator.reduce(v, "sum") for k, v in sums.items()}
    loss = float(total)
    norm = None
    if math.isfinite(loss):
        norm = grad_norm(accelerator, loss_fn, tc.max_grad_norm)
        optimizer.step()  # under DeepSpeed the engine stepped already (see train/distributed.py)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, {name: float(value) for name, value in sums.items()}


def loop(run: Run) -> None:
    """The optimizer steps from run.progress.step to the plan's last, with logging, eval and checkpoints, their
    progress shown as they go (a bar on a terminal, a line every half minute in a log)."""
    with Phase("training", run.plan.total_steps, "step", initial=run.progress.step, leave=True,
               show=run.main) as bar:  # fmt: skip
        steps(run, bar)


def steps(run: Run, bar: Phase) -> None:
    tc, plan, progress, log = run.tc, run.plan, run.progress, run.log
    eval_samples = run.eval_samples
    window = progress.window
    run.loss_fn.train()
    while progress.step < plan.total_steps:
        tick = time.perf_counter()
        work = run.objective.step(plan.micro_batches(progress.step), plan)
        trained, tokens = work.trained, work.tokens
        loss, norm, stats = optimizer_step(run.loss_fn, work.batches, work.units, run.accelerator, tc, run.optimizer,
                                           run.scheduler)  # fmt: skip
        done = progress.step + 1
        if not math.isfinite(loss):
            last = checkpoint.checkpoints(run.files.root)
            raise LossDiverged(
                f"training: the loss became {loss} at step {done}; lower training_config.learning_rate or check "
                "the data" + (f"; the last good checkpoint is {last[-1]}" if last else "")
            )
        seconds = time.perf_counter() - tick
        progress.step, progress.tokens, progress.trained_tokens = (
            done,
            progress.tokens + tokens,
            progress.trained_tokens + trained,
        )
        progress.train_seconds += seconds
        window.loss, window.tokens, window.trained, window.units = (
            window.loss + loss,
            window.tokens + tokens,
            window.trained + trained,
            window.units + work.units,
        )
        window.seconds += seconds
        window.stats = {name: window.stats.get(name, 0.0) + value for name, value in stats.items()}
        lr = run.scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss / max(work.units, 1):.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{window.tokens / window.seconds:.0f}")  # fmt: skip

        last_step = done == plan.total_steps
        if tc.logging_strategy != "no" and (
            due(tc.logging_strategy, tc.logging_steps, done, plan) or last_step or (tc.logging_first_step and done == 1)
        ):
            window = progress.window = log_window(log, window, done, plan, lr, norm, progress)
        final_eval = last_step and (tc.do_eval or tc.eval_strategy != "no")
        stop = False
        if eval_samples and (due(tc.eval_strategy, tc.eval_steps or tc.logging_steps, done, plan) or final_eval):
            stop = evaluate(run, done, last_step, bar)
        if stop:  # early stopping: the window since the last log line is logged, no checkpoint is written
            if window.units or window.trained:
                progress.window = log_window(log, window, done, plan, lr, norm, progress)
            chosen, progress.selection.stopped_early = run.metric or "", True
            bar.write(f"step {done}: stopping early: {chosen} has not improved for {tc.early_stopping_patience} "
                      f"evaluations (best {shown(chosen, progress.selection.best_value or 0.0)} at step "
                      f"{progress.selection.best_step})")  # fmt: skip
            break
        if not last_step and due(tc.save_strategy, tc.save_steps, done, plan):
            weights = gathered_adapter(run.accelerator, run.loss_fn)  # every process takes part
            saved = {"step": done, "progress": dataclasses.asdict(progress), "config": run.config.to_dict(),
                     "torch_threads": torch.get_num_threads()}  # fmt: skip
            best = run.best_weights if progress.selection.best_step != done else None  # else the adapter itself
            if run.main:
                checkpoint.save(run.files.root, run.model, run.optimizer, run.scheduler, saved, tc.save_total_limit,
                                weights, best, progress.selection.best_step)  # fmt: skip


def log_window(log: Any, window: Window, done: int, plan: Plan, lr: float, norm: float | None,
               progress: Progress) -> Window:  # fmt: skip
    """One training log line: the means since the last one. Returns the new, empty window."""
    units = max(window.units or window.trained, 1)  # a window saved before units existed counted tokens
    log.write({"step": done, "epoch": round(plan.epochs_done(done), 4), "loss": window.loss / units,
               **{name: value / units for name, value in window.stats.items()}, "lr": lr, "grad_norm": norm,
               "tokens_per_s": window.tokens / window.seconds, "tokens": progress.tokens,
               "elapsed_s": round(progress.train_seconds, 2)})  # fmt: skip
    return Window()


def evaluate(run: Run, done: int, last_step: bool, bar: Phase) -> bool:
    """Measure and log the eval metrics after step `done`; count it for model selection (keeping the best
    adapter's weights when the run loads the best at the end). True when early stopping's patience has run out."""
    metrics = evaluation.measure(run, done, last_step)
    run.log.write({"step": done, **metrics})
    bar.write(f"step {done}: {evaluation.headline(metrics, run.metric)}")
    if run.main:
        plot_losses(run.log.records, run.files.loss_plot)
    if run.metric is None:
        return False
    tc, chosen = run.tc, run.progress.selection
    chosen.metric = run.metric
    better = greater_is_better(tc, run.metric)
    if record(chosen, done, metrics[run.metric], better, tc.early_stopping_threshold) and tc.load_best_model_at_end:
        run.best_weights = adapter_weights(run.model)
    return not last_step and patience_out(chosen, tc)


def adapter_weights(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights as saved (peft's names), copied to the CPU: the best evaluation's, kept."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
