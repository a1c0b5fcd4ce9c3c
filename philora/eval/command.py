"""`philora eval`: a trained adapter on held-out data, the fine-tuned model beside its base.

The eval data goes through the same pipeline as training, with the run's data settings from run.json (format,
columns, max_length, overlong, train_on), so the loss is measured on the same tokens and masks the run measured.
By default the data is the run's own eval set, as the run chose it (a file, a seeded fraction of train, or the
sample eval split), and generation uses the run's eval batch size and generation length: then the numbers match
what `philora train` recorded. The model loads once; the base answers with the adapter disabled, unless the run's
saved base answers were computed exactly as they would be here (eval/base_answers.py): then they are reused.
The files go to --output, or to the run's eval/ (never beside the run's own eval.json, which they would replace).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from philora import progress
from philora.config import DataSection, ModelSection
from philora.data import Split, load_source, prepare, source_specs
from philora.data.lengths import answer_budget
from philora.data.render import ChatEncoder
from philora.errors import UserError, first_problems
from philora.eval import base_answers, report, runner, table
from philora.flags import BASE, typed
from philora.infer.adapters import (
    Adapter,
    autocast,
    base_named,
    known_fields,
    load,
    read_adapter,
    read_run_config,
)
from philora.model.preference import PairBatches, PreferenceLoss
from philora.rundir import RunDir

DEFAULT_BATCH_SIZE = 16  # for adapters without a run.json


def main(args: argparse.Namespace) -> int:
    if not args.adapter:
        raise UserError("--adapter: required; give the adapter/ dir of a run (or the run dir itself)")
    adapter = read_adapter(args.adapter)
    run = read_run_config(adapter)
    dc = data_section(run)
    tc = run["training_config"] if run else {}
    batch_size = _positive("--batch-size", args.batch_size, tc.get("per_device_eval_batch_size", DEFAULT_BATCH_SIZE))
    # null (a run without eval data, an adapter from elsewhere): from the references of the data evaluated
    max_new = _positive("--max-new-tokens", args.max_new_tokens, tc.get("generation_max_length"))
    limit = _positive("--limit", args.limit, None)
    out = Path(args.output).expanduser() if args.output else default_output(adapter, run is not None)
    check_output(out, adapter, run is not None)  # before the model loads: a refusal costs seconds, not an evaluation

    from philora.model.load import load_tokenizer

    # The data before the model: a bad file fails in seconds, not after loading gigabytes of weights.
    flag = typed(args, "base", BASE)
    base = ModelSection(name_or_path=args.base) if args.base else adapter.model
    with base_named([adapter], args.base, flag):
        # the pad notice comes with the model (load), after the data's checks
        tokenizer = load_tokenizer(replace(base, trust_remote_code=args.trust_remote_code), say_pad=False)
    encoder = ChatEncoder(tokenizer)
    split, spec = eval_split(dc, args.data, run, encoder, adapter)
    if limit is not None:
        split = Split(split.records[:limit])
    if max_new is None:
        max_new = answer_budget(split.samples)[0]
    settings = {
        "command": "eval",
        "run": adapter.path.parent.name if run else adapter.path.name,
        "adapter": str(adapter.path),
        "base_model": args.base or adapter.model.name_or_path or "embedded",
        "data": spec,
        "conversations": len(split.conversations),
        "limit": limit,
        "data_settings": {k: getattr(dc, k) for k in ("format", "columns", "max_length", "overlong", "train_on")},
    }
    # a dpo run that started from model.adapter measures its rewards against that adapter: load it beside
    start = (run or {}).get("model", {}).get("adapter") if tc.get("method") == "dpo" and split.pairs else None
    loaded = [adapter] + ([read_adapter(start, "start")] if start else [])
    model, _ = load(loaded, args.base, args.dtype, args.trust_remote_code, flag)
    prompts = runner.prompts_and_references(split.conversations, encoder)
    arithmetic = adapter if args.dtype is None else None  # the run's own, for the run's numbers
    saved = None
    if run is not None and prompts and not args.no_base:
        # as eval would compute them: the base it loads (never quantised) with the adapter disabled
        bare = replace(base, quantization=None, adapter=None)
        wanted = base_answers.answered(bare, model, arithmetic.autocast if arithmetic else "no", encoder,
                                       [(p, t) for p, _, t in prompts], max_new, batch_size)  # fmt: skip
        saved, why = base_answers.reusable(RunDir(adapter.path.parent).base_answers, wanted)
        progress.say(f"{'reusing' if saved else 'computing'} the base model's answers: {why}")
        settings["base_answers"] = "reused from the run" if saved else "computed here"
    with autocast(arithmetic):
        evaluation = runner.evaluate_model(
            model,
            encoder,
            [chosen for chosen, _ in split.pairs] or split.samples,  # a pair's loss is its chosen answer's
            prompts,
            batch_size=batch_size,
            max_new_tokens=max_new,
            base=not args.no_base,
            base_answers=saved,
            settings=settings,
        )
        if split.pairs:
            pairs = PairBatches(split.pairs, encoder.tokenizer.pad_token_id, 2 * dc.max_length)
            evaluation["preference"] = preference(model, pairs, tc, batch_size, start)
            measured = evaluation["preference"]
            print(f"philora: {table.format_preference(measured, measured['method'])}", file=sys.stderr)
    report.write_results(out, evaluation, adapter.path.parent if run else None)
    print(table.format_comparison(evaluation), file=sys.stderr)
    print(f"philora: wrote eval.json, eval.md and report.html to {out}", file=sys.stderr)
    return 0


def preference(model: Any, pairs: PairBatches, tc: dict[str, Any], batch_size: int, start: str | None
               ) -> dict[str, Any]:  # fmt: skip
    """The run's preference loss and reward statistics on the pairs, averaged per pair. dpo's reference is the
    model the run started from: the base (the adapter disabled), or the base with the run's model.adapter."""
    method = tc.get("method") if tc.get("method") in ("dpo", "orpo") else "dpo"
    loss = PreferenceLoss(model, method, tc.get("beta", 0.1), tc.get("loss_type", "sigmoid"), tc.get("loss_weights"))
    if method == "dpo":
        if start:
            model.set_adapter("start")
            pairs.reference = pairs.sequence_logprobs(loss, batch_size)
            model.set_adapter("default")
        else:
            with model.disable_adapter():
                pairs.reference = pairs.sequence_logprobs(loss, batch_size)
    return {"method": method, "pairs": len(pairs.pairs), **pairs.evaluate(loss, batch_size)}


def _positive(flag: str, value: int | None, default: int | None) -> int | None:
    if value is None:
        return default
    if value < 1:
        raise UserError(f"{flag} {value}: must be at least 1")
    return value


def data_section(run: dict[str, Any] | None) -> DataSection:
    """The run's data settings (defaults for an adapter from elsewhere)."""
    return DataSection() if run is None else known_fields(DataSection, run["data"])


def check_output(out: Path, adapter: Adapter, in_run: bool) -> None:
    """--output may be anything but the run's own folder or its adapter/: train's eval.json, eval.md and
    report.html there are the run's record (run.json and the model card cite them), not for an eval to replace."""
    refused = {adapter.path.resolve(): "the adapter's folder"}
    if in_run:
        refused[adapter.path.parent.resolve()] = "the run's own folder, where train wrote its evaluation"
    if (where := refused.get(out.resolve())) is not None:
        default = default_output(adapter, in_run)
        raise UserError(f"--output {out}: is {where}; leave --output out for {default}, or choose another folder")
    report.check_output(out)


def default_output(adapter: Adapter, in_run: bool) -> Path:
    """RUN/eval beside a run's adapter/; ADAPTER-eval beside an adapter from elsewhere."""
    if in_run:
        return RunDir(adapter.path.parent).eval_output
    return adapter.path.with_name(adapter.path.name + "-eval")


def eval_split(
    dc: DataSection, data: str | None, run: dict[str, Any] | None, encoder: ChatEncoder, adapter: Adapter
) -> tuple[Split, str]:
    """The conversations to evaluate and where they came from: --data, else the run's own eval set."""
    if data is not None:
        return read_split(data, "--data", dc, encoder), data
    if run is None:
        raise UserError(f"--adapter {adapter.path}: no run.json beside it to name its eval data; pass --data FILE")
    if isinstance(dc.eval, float):  # a seeded fraction of train, re-drawn exactly as the run drew it
        try:
            prepared = prepare(
                dc, encoder.tokenizer, run["training_config"]["seed"], run["training_config"].get("method", "sft")
            )
        except UserError as e:
            raise UserError(*(f"the run's data.train: {p}; pass --data FILE" for p in e.problems)) from None
        assert prepared.eval is not None
        return prepared.eval, f"{dc.eval:g} of {dc.train} (held out with seed {run['training_config']['seed']})"
    _, spec = source_specs(dc, run.get("training_config", {}).get("method", "sft"))
    if spec is None:
        raise UserError(f"--adapter {adapter.path}: its run had no eval data (data.eval: null); pass --data FILE")
    split = read_split(spec, "the run's data.eval", dc, encoder)
    if dc.max_eval_samples is not None:  # as the run did
        split = Split(split.records[: dc.max_eval_samples])
    return split, spec


def read_split(spec: str, what: str, dc: DataSection, encoder: ChatEncoder) -> Split:
    """One source read and encoded like training data; any bad row is an error here, whatever on_bad_row says,
    since scores over a silently shortened set would mislead."""
    try:
        source = load_source(spec, "eval", dc, encoder)
    except UserError as e:
        raise UserError(*(f"{what} {p}" if p.startswith(spec) else f"{what} {spec}: {p}" for p in e.problems)) from None
    if source.problems:
        listed, count = first_problems(source.problems)
        raise UserError(
            *listed,
            f"{what} {spec}: {count}; fix them (`philora data check {spec}` lists each) or evaluate on another file",
        )
    split = Split(source.records)
    if not split.samples:
        raise UserError(f"{what} {spec}: no conversation with a trained token to evaluate on")
    return split
