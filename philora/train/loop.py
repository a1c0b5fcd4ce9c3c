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
from philora.eval import runner
from philora.progress import Phase
from philora.rundir import plot_losses
from philora.train import checkpoint
from philora.train.distributed import backward_kwargs, gathered_adapter, grad_norm
from philora.train.plan import Plan
from philora.train.state import Run, Window


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
    pad_id = run.prepared.encoder.tokenizer.pad_token_id
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
            units = max(window.units or window.trained, 1)  # a window saved before units existed counted tokens
            log.write({"step": done, "epoch": round(plan.epochs_done(done), 4), "loss": window.loss / units,
                       **{name: value / units for name, value in window.stats.items()}, "lr": lr, "grad_norm": norm,
                       "tokens_per_s": window.tokens / window.seconds, "tokens": progress.tokens,
                       "elapsed_s": round(progress.train_seconds, 2)})  # fmt: skip
            window = progress.window = Window()
        final_eval = last_step and (tc.do_eval or tc.eval_strategy != "no")
        if eval_samples and (due(tc.eval_strategy, tc.eval_steps or tc.logging_steps, done, plan) or final_eval):
            if run.eval_objective is not None:  # a preference loss and its statistics on the eval pairs
                measured = run.eval_objective.evaluate(run.loss_fn, tc.per_device_train_batch_size)
                run.final_pair_eval = measured if last_step else None
                log.write({"step": done, **{f"eval_{name}": value for name, value in measured.items()}})
                eval_loss = measured["loss"]
            else:
                eval_loss = runner.eval_loss(run.loss_fn, eval_samples, tc.per_device_eval_batch_size, pad_id,
                                             show=run.main)  # fmt: skip
                log.write({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
            bar.write(f"step {done}: eval loss {eval_loss:.4f}")
            if run.main:
                plot_losses(log.records, run.files.loss_plot)
        if not last_step and due(tc.save_strategy, tc.save_steps, done, plan):
            weights = gathered_adapter(run.accelerator, run.loss_fn)  # every process takes part
            saved = {"step": done, "progress": dataclasses.asdict(progress), "config": run.config.to_dict(),
                     "torch_threads": torch.get_num_threads()}  # fmt: skip
            if run.main:
                checkpoint.save(run.files.root, run.model, run.optimizer, run.scheduler, saved, tc.save_total_limit,
                                weights)  # fmt: skip
