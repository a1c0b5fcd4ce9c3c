"""`philora train`: data and model in, a PEFT adapter and a record of the run out.

A run goes through four named stages, each a function of one `Run` that holds what the stages share:
`set_up` (settings, output dir, resume point, data) → `build` (model, LoRA, plan, optimizer) → `fit` (the loop in
train/loop.py, from the start or a checkpoint) → `finish` (adapter, plots, evaluation, run.json, the
adapter's model card).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora import data, hardware, progress
from philora.config import Config, TrainingSection
from philora.config.relative import missing_data
from philora.data import report as data_report
from philora.data.batching import row_width
from philora.errors import UserError
from philora.eval import base_answers, report, runner, table
from philora.export import card
from philora.infer.adapters import read_adapter, read_run_config
from philora.lora import slices
from philora.lora.targets import INIT_FROM_WEIGHTS, apply_lora, describe_adapters
from philora.model import fast_path, packed_attention
from philora.model.load import load_model, longrope_boundary, notice, tokenizer_and_pad_notice, without_bitsandbytes
from philora.preflight.command import gate, model_context
from philora.preflight.report import size
from philora.progress import Phase
from philora.rundir import RunDir, plot_losses
from philora.train import checkpoint, neftune, selection
from philora.train.distributed import configure, gathered_adapter, sharded
from philora.train.evaluation import answer_scores, logged_metrics, prompts_scored, scores_answers
from philora.train.loop import loop
from philora.train.metrics import MetricsLog, reporters, require_reporters
from philora.train.objective import make_objective, reference_logprobs, save_reference
from philora.train.output import prepare_output_dir, save_adapter, save_initial_adapter
from philora.train.plan import make_plan
from philora.train.record import write_run_record
from philora.train.selection import Selection
from philora.train.state import Progress, Run
from philora.train.verdict import Regressed, choose_adapter, regression


def train(config: Config, resume: str | bool | None = None) -> TrainResult:
    """Run a whole training job per `config`: set up, build, fit, finish."""
    with without_bitsandbytes(config.model.quantization is None):
        run = set_up(config, resume)
        build(run)
        fit(run)
        return finish(run)


def set_up(config: Config, resume: str | bool | None) -> Run:
    """Settings applied, the output dir prepared (or the checkpoint to resume found), the data read and encoded."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if missing := missing_data(config):  # before anything loads or the output dir is touched
        raise UserError(*missing)
    tc = config.training_config
    dev = hardware.device()
    # Under `accelerate launch` or torchrun this is one of several processes; alone it is the only one.
    run = Run(config, Accelerator(mixed_precision=mixed_precision(tc, dev), cpu=dev.type == "cpu"),
              RunDir(Path(tc.output_dir)))  # fmt: skip
    with run.accelerator.main_process_first():  # the main process prepares the output dir and data cache first
        run.resume_from = check_resume(run.files.root, resume, config, clean=run.main)
        set_log_level(tc.log_level)
        set_seed(tc.seed)
        log_dir = Path(tc.logging_dir) if tc.logging_dir else run.files.tensorboard
        require_reporters(tc.report_to)  # a missing package fails before the slow parts
        run.tokenizer, pad_notice = tokenizer_and_pad_notice(config.model)  # said once the data and config pass
        run.prepared = data.prepare(config.data, run.tokenizer, tc.seed, tc.method, model_context(config))
    for line in data.resolved_lines(config, run.prepared):  # what auto chose from the data just read
        run.say(f"data: {line}")
    data.require_usable(run.prepared, config.data, tc.method)
    checked = gate(config, run.prepared)  # what `philora check` would refuse stops the run before the model loads
    if run.main:  # after the checks: a run they stop leaves no file behind that a rerun would have to overwrite
        tell_data(run.prepared, config, run.files)
    for warning in checked.warnings:
        run.say(f"warning: {warning}", result=True)
    if run.main and pad_notice is not None:
        notice(pad_notice)
    if run.main and (estimate := checked.facts.get("memory")) is not None:
        progress.say(f"memory: one step needs about {size(estimate['total'])} (estimate; `philora check` itemises it)")
    # the reporters once the checks pass (no dashboard run for a run they stop), with max_length and the other
    # values auto chose
    sinks = reporters(tc.report_to, log_dir, tc.run_name, config.to_dict()) if run.main else []
    run.log = MetricsLog(run.files.metrics if run.main else None, sinks)
    if run.prepared.eval:
        run.prompts = runner.prompts_and_references(run.prepared.eval.conversations, run.prepared.encoder)
    if tc.eval_strategy != "no" and run.eval_samples:  # evaluations during training choose the best step
        run.metric = selection.metric_name(tc, scores_answers(run))
        selection.require_metric(run.metric, logged_metrics(run))
    if tc.load_best_model_at_end and sharded(run.accelerator):
        raise UserError("training_config.load_best_model_at_end: not supported under FSDP or DeepSpeed yet (their "
                        "weights are sharded); train with configs/accelerate/ddp.yaml or one process")  # fmt: skip
    return run


def tell_data(prepared: data.PreparedData, config: Config, files: RunDir) -> None:
    """The data report in full in the run dir, and on screen in one line (`philora check` showed it whole), or whole
    with -v."""
    files.add_to_manifest([files.data_report.name])  # a resumed run of an older philora did not list it
    files.data_report.write_text("\n".join(data_report.describe(prepared, config.data)) + "\n")
    if progress.verbosity() >= progress.VERBOSE:
        for line in data_report.describe(prepared, config.data, color=sys.stderr.isatty()):
            progress.say(f"data: {line}")
    else:
        progress.say(f"data: {data_report.summary(prepared, config.data)} (in full: {files.data_report})")


def build(run: Run) -> None:
    """The model (and its answers before training changes it), LoRA (new, or model.adapter's), the objective
    (with dpo's reference log-probabilities), the step plan, optimizer and schedule."""
    config, tc, accelerator = run.config, run.tc, run.accelerator
    model = load_model(config.model, training=True)
    if tc.gradient_checkpointing:
        checkpoint_layers(model, tc)
    if config.model.adapter is not None:
        model = starting_adapter(model, config)
    if run.generates and run.resume_from is None:
        with accelerator.autocast():  # in the run's arithmetic, as every evaluation of the run
            questions = [(p, t) for p, _, t in run.prompts]
            answers = runner.answer(model, run.prepared.encoder, questions, tc.generation_max_length,
                                    tc.per_device_eval_batch_size, "starting model")  # fmt: skip
        # with what they were computed from, so `philora eval` can tell when it may reuse them
        computed = base_answers.answered(config.model, model, accelerator.mixed_precision, run.prepared.encoder,
                                         questions, tc.generation_max_length,
                                         tc.per_device_eval_batch_size)  # fmt: skip
        base_answers.save(run.files.base_answers, answers, computed)
        if scores_answers(run):  # where the curves of the evaluations during training start
            scored = prompts_scored(run)
            run.log.write({"step": 0, **answer_scores(answers[: len(scored)], scored, run)})
    if config.model.adapter is None:
        model = apply_lora(model, config.peft_config, quantized=config.model.quantization is not None)
    fast_path.install(model)
    if tc.neftune_noise_alpha:
        neftune.attach(model, tc.neftune_noise_alpha)
    run.model = model
    if run.main and config.model.adapter is None:
        run.initial_adapter = save_initial_adapter(run.model, run.files.root, config.peft_config)
    run.objective = make_objective(run.prepared, tc.method, config.data.max_length,
                                   flat=config.data.packing and packed_attention.flat_rows(run.model))  # fmt: skip
    if tc.method != "sft" and run.prepared.eval is not None:
        run.eval_objective = make_objective(run.prepared, tc.method, config.data.max_length, "eval")
    width = row_width(tc.method, config.data.max_length)
    run.plan = make_plan(run.objective.lengths, tc, width, config.data.packing, accelerator.num_processes,
                         accelerator.process_index, longrope_boundary(run.model.config))  # fmt: skip
    loss_fn = run.objective.loss(run.model, tc)
    if tc.method == "dpo":
        attach_reference(run, loss_fn)
    optimizer, run.scheduler = make_optimizer(run.model, tc, run.plan.total_steps)
    configure(accelerator.state, tc)
    run.loss_fn, run.optimizer = accelerator.prepare(loss_fn, optimizer)


def starting_adapter(model: Any, config: Config) -> Any:
    """model.adapter on `model`, trainable, with its own LoRA settings (a philora run's slices held as it held
    them); the base it was trained on must be this one."""
    from peft import PeftModel

    adapter = read_adapter(str(config.model.adapter))
    if same_model(adapter.model.name_or_path) != same_model(config.model.name_or_path):
        trained_on = adapter.model.name_or_path or "the embedded model"
        raise UserError(
            f"model.adapter: {adapter.path} was trained on {trained_on}, not on model.name_or_path "
            f"{config.model.name_or_path or '(the embedded model)'}; set model.name_or_path to its base"
        )
    peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=True)
    run_config = read_run_config(adapter)
    if run_config is not None:
        targets = run_config["peft_config"]["target_modules"]
        specs = [s for t in (targets if isinstance(targets, list) else []) if (s := slices.parse(t)) is not None]
        slices.restrict(peft_model, specs, run_config["peft_config"]["r"])
    print(describe_adapters(peft_model).replace("LoRA on", f"LoRA from {adapter.path} on"), file=sys.stderr)
    return peft_model


def same_model(name: str | None) -> str | None:
    """A model's name for comparison: a local dir by its resolved path, a hub id or None (embedded) as is."""
    return str(Path(name).expanduser().resolve()) if name is not None and Path(name).expanduser().is_dir() else name


def attach_reference(run: Run, loss_fn: Any) -> None:
    """dpo: the reference log-probabilities of the train pairs the plan uses (all of them, unless max_steps ends
    the run inside its first epoch) and of the eval pairs, from the model as training starts; a resumed run reads
    the ones its first part computed."""
    started = time.time()
    plan = run.plan
    used = sorted({k for step in range(plan.total_steps) for rows in plan.micro_batches(step) for row in rows
                   for k in row})  # fmt: skip
    for split, objective, indices in (("train", run.objective, used), ("eval", run.eval_objective, None)):
        if objective is None:
            continue
        path = run.files.reference(split)
        if run.resume_from is not None and path.is_file():
            objective.reference = np.load(path)
            continue
        # Batches of per_device_train_batch_size packed rows, like a step's: on CPU a forward runs fastest on few
        # rows (the demo's 53 pairs: 64 s one row at a time, 103 s twenty), and a step's rows fit in memory.
        count = len(objective.pairs if indices is None else indices)
        with Phase(f"dpo reference, {split} pairs", count, "pair", show=run.main) as phase:  # time so far, in logs
            objective.reference = reference_logprobs(loss_fn, objective, run.tc.per_device_train_batch_size,
                                                     run.accelerator, indices)  # fmt: skip
            phase.update(count)
        if run.main:
            save_reference(path, objective.reference)
    pairs = len(used) + (len(run.eval_objective.pairs) if run.eval_objective else 0)
    if run.main:
        progress.say(f"dpo: reference log-probabilities of {pairs:,} pairs in {time.time() - started:.0f}s "
                     f"(the model as training starts, kept in {run.files.reference('train').name})")  # fmt: skip


def fit(run: Run) -> None:
    """The loop, from the first step or from the checkpoint being resumed."""
    if run.resume_from is not None:
        if sharded(run.accelerator):
            raise UserError(
                "--resume: resuming under FSDP or DeepSpeed is not supported yet (their optimizer state is sharded); "
                "resume with configs/accelerate/ddp.yaml or one process"
            )
        found = run.resume_from
        checkpoint.restore(found, run.model, run.optimizer, run.scheduler)
        run.progress = Progress.from_dict(found.state["progress"])
        if run.progress.selection.metric != run.metric:  # evaluation turned on, or answers scored, from here on
            run.progress.selection = Selection(run.metric)
        if run.tc.load_best_model_at_end and run.progress.selection.best_step is not None:  # as the run held them
            run.best_weights = found.adapter if run.progress.selection.best_step == found.step else found.best
        run.log.truncate_after(run.progress.step)
        run.say(f"resuming from {found.path} at step {run.progress.step}/{run.plan.total_steps}")
        if run.main:
            warn_if_threads_differ(found.state.get("torch_threads"))
            if newer := checkpoint.set_aside_newer(run.files.root, found):
                run.say(f"set aside {', '.join(p.name for p in newer)} (newer than {found.path.name}, no longer "
                        "counted): this run writes those steps again", result=True)  # fmt: skip
    loop(run)


def finish(run: Run) -> TrainResult:
    """The adapter (gathered from every process under FSDP/DeepSpeed), the loss plot, the evaluation, run.json, and
    the adapter's README.md model card in place of peft's template."""
    config, tc, files = run.config, run.tc, run.files
    weights = gathered_adapter(run.accelerator, run.loss_fn)
    run.accelerator.wait_for_everyone()
    if not run.main:
        return TrainResult(files.root, run.model, None)
    chosen = choose_adapter(run)
    save_adapter(files, run.model, run.tokenizer, weights, run.initial_adapter)
    plot_losses(run.log.records, files.loss_plot)
    run.log.close()
    evaluation = None
    if run.generates:  # the same evaluation and files as `philora eval`, base answers from before training
        assert run.prepared.eval is not None
        source = data.source_specs(config.data, tc.method)[1] or f"{config.data.eval} of {config.data.train}"
        with run.accelerator.autocast():
            evaluation = runner.evaluate_model(
                run.model,
                run.prepared.encoder,
                run.eval_samples,
                run.prompts,
                batch_size=tc.per_device_eval_batch_size,
                max_new_tokens=tc.generation_max_length,
                # PiSSA/OLoRA rewrote the base weights in memory, and model.adapter's start is not the bare base:
                # disabling the adapter would not give the starting model back
                base=config.model.adapter is None
                and not str(config.peft_config.init_lora_weights).startswith(INIT_FROM_WEIGHTS),
                # recorded before training; a run resumed from an older philora's checkpoint answers them now
                base_answers=base_answers.read(files.base_answers),
                settings={"command": "train", "run": files.root.name, "adapter": str(files.adapter),
                          "base_model": config.model.name_or_path or "embedded", "data": source,
                          "conversations": len(run.prepared.eval.conversations)},
            )  # fmt: skip
    if run.eval_objective is not None:
        measured = run.final_pair_eval
        if measured is None:
            with run.accelerator.autocast():
                measured = run.eval_objective.evaluate(run.loss_fn, tc.per_device_train_batch_size)
        evaluation = {**(evaluation or {}), "preference": {"pairs": len(run.eval_objective.pairs), **measured}}
        run.say(table.format_preference(evaluation["preference"], tc.method), result=True)
    write_run_record(files.root, config, run.prepared, run.model, run.progress, run.log.records, evaluation,
                     time.time() - run.started, run.accelerator.num_processes,
                     run.accelerator.mixed_precision, chosen)  # fmt: skip
    if evaluation is not None and run.generates:
        report.write_results(files.root, evaluation, files.root)
        print(table.format_comparison(evaluation), file=sys.stderr)
    card.write_card(files.adapter)  # last: it reads run.json and eval.json
    worse = regression(run, evaluation)
    if worse is not None:
        run.say(f"warning: {worse}; what usually helps with {tc.method}: {selection.fixes(tc)}", result=True)
    run.say(f"done in {time.time() - run.started:.0f}s; adapter in {files.adapter}", result=True)
    if worse is not None and tc.fail_on_regression:
        raise Regressed(f"training_config.fail_on_regression: {worse}")
    return TrainResult(files.root, run.model, evaluation)


@dataclass
class TrainResult:
    output_dir: Path
    model: Any  # the trained peft model, in memory
    evaluation: dict[str, Any] | None


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


def check_resume(out: Path, resume: str | bool | None, config: Config,
                 clean: bool = True) -> checkpoint.Checkpoint | None:  # fmt: skip
    """The checkpoint to resume from, read and checked before the model is built (the newest that loads, each newer
    one skipped with a warning; one written with different settings refused), or None for a new run, whose output
    dir is prepared when `clean` (by the main process only, in a multi-process run, which also does the talking)."""
    if not resume:
        if clean:
            prepare_output_dir(out, config.training_config.overwrite_output_dir)
        return None
    found, skipped = checkpoint.choose(out, resume)
    for line in skipped if clean else []:
        print(f"philora: warning: {line}", file=sys.stderr)
    if config.data.max_length is None:  # auto: the length the run chose from its data, which the checkpoint recorded
        config.data.max_length = found.state["config"].get("data", {}).get("max_length")
    if diffs := checkpoint.config_differences(found.state["config"], config.to_dict()):
        raise UserError(*(f"--resume {found.path}: {d}; resume with the same settings" for d in diffs))
    return found


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


def warn_if_threads_differ(saved: int | None) -> None:
    """A CPU matmul may split its sums by thread, so a resumed run is bit-exact only with the same thread count."""
    now = torch.get_num_threads()
    if saved is not None and saved != now:
        print(
            f"philora: warning: resuming with {now} torch threads where the run had {saved}; the continuation may "
            f"differ from an uninterrupted run in the last bits. For a bit-exact resume set OMP_NUM_THREADS={saved}",
            file=sys.stderr,
        )
