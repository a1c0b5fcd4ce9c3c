"""The `philora` command: parse, load the config, call one function. User mistakes exit 2 without a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from philora import __version__, progress
from philora.errors import UserError
from philora.flags import Deprecated, Typed

GGUF_TYPES = ("f16", "bf16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")  # GGUF export, see philora.export.command


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config or preset name (default: the embedded demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a config value, e.g. --set training_config.max_steps=20 (repeatable)",
    )


def _trust_arg(p: argparse.ArgumentParser) -> None:
    # The only grant: a config file or a copied run dir's run.json is data, and data never runs code on its own.
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model run its own Python code (auto_map in its config); a config or run.json never grants it",
    )


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends with "(default: X)" where a flag has a default worth saying: not None, False or [] (nothing
    happens unless given), and not where its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        silent = action.default in (None, False, [], argparse.SUPPRESS) or "default" in text
        return text if silent else f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """philora's parsers: every (sub)command's help shows its defaults (subparsers are made of this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        _verbosity_args(self)


VERBOSITY_FLAGS = (
    ("-q", "--quiet", progress.QUIET, "only warnings, errors and results: no progress, no notices"),
    ("-v", "--verbose", progress.VERBOSE, "also the libraries' own logs, and train's full data report"),
)


def _verbosity_args(p: argparse.ArgumentParser) -> None:
    """-q/-v on every parser, so `philora -q train` and `philora train -q` both work. No default (SUPPRESS): a
    subcommand's parser would otherwise overwrite what the top-level one read; main() reads it as progress.NORMAL."""
    say = p.add_mutually_exclusive_group()
    for short, long, level, text in VERBOSITY_FLAGS:
        say.add_argument(short, long, dest="verbosity", action="store_const", const=level, default=argparse.SUPPRESS,
                         help=text)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="philora", description="LoRA/QLoRA fine-tuning for Phi-3 and causal LMs.")
    p.add_argument("--version", action="version", version=f"philora {__version__}")
    # not required: bare `philora` prints this help (main), rather than an error about a missing COMMAND
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune with LoRA (no --config: the embedded demo on CPU)")
    _config_args(train)
    _trust_arg(train)
    train.add_argument("--output", metavar="DIR", help="output directory (training_config.output_dir)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="DIR",
        help="continue from the newest checkpoint in the output dir, or from DIR",
    )
    train.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 1 when the trained model scores worse than the one it started from (training_config."
        "fail_on_regression); the adapter and records are written all the same",
    )

    preflight = sub.add_parser(
        "check",
        help="everything that can fail, before training: config, data, model (no weights loaded), template, tokens, "
        "memory estimate (exit 2 on a problem)",
    )
    _config_args(preflight)
    _trust_arg(preflight)
    preflight.add_argument("--time", action="store_true", help="also time a few real steps and estimate the run's ETA")
    preflight.add_argument("--json", action="store_true", help="print the report as JSON")

    config = sub.add_parser(
        "config", help="print the resolved config: every field with its value, where it came from and its meaning"
    )
    _config_args(config)

    data = sub.add_parser("data", help="inspect training data").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    check = data.add_parser(
        "check",
        help="read and tokenise a data file as train would; report rows, rejects, lengths, masks (exit 2 on bad rows)",
    )
    check.add_argument("file", metavar="FILE", help="file, folder, saved datasets dir or hub id (owner/name:split)")
    _config_args(check)
    # dest `model`: run() makes it the model.name_or_path override, as for a config's own value
    check.add_argument("--base", dest="model", action=Typed, metavar="M",
                       help="the tokenizer of this base model dir or hub id (model.name_or_path)")  # fmt: skip
    check.add_argument("--model", dest="model", action=Deprecated, use="--base", help=argparse.SUPPRESS)
    _trust_arg(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _init_command(sub)
    _sweep_command(sub)
    _after_training_commands(sub)
    return p


def _sweep_command(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="search settings: real train runs over --set-range values (Optuna; poor runs stopped early), the best "
        "one's config written as DIR/best.yaml",
    )
    _config_args(sweep)
    sweep.add_argument(
        "--set-range",
        dest="ranges",
        metavar="KEY=SPEC",
        action="append",
        required=True,
        help="a config key to search: LOW:HIGH (uniform), LOW:HIGH:log (log-uniform) or [a,b,c] (choices); whole "
        "numbers where the key takes them, e.g. training_config.learning_rate=1e-5:1e-3:log (repeatable)",
    )
    sweep.add_argument("--trials", type=int, default=8, metavar="N", help="finished trials to reach, earlier runs' too")
    sweep.add_argument("--time-budget", metavar="T", help="start no trial after T: seconds, or e.g. 30m, 2h")
    sweep.add_argument(
        "--output", default="out/sweep", metavar="DIR", help="a dir per trial, logs, results; rerun to continue"
    )
    sweep.add_argument(
        "--metric", metavar="NAME", help="what to compare trials by (default: the metric the first run selects by)"
    )
    sweep.add_argument(
        "--greater-is-better",
        action=argparse.BooleanOptionalAction,
        help="the metric's direction (default: lower for a name ending in loss or ppl, else higher)",
    )


def _init_command(sub: Any) -> None:
    init = sub.add_parser(
        "init",
        help="write a commented starter config for your data on this machine (format, columns, max_length, batch, "
        "steps and evaluation chosen for it)",
    )
    init.add_argument("data", metavar="DATA", help="your training data: file, folder, saved datasets dir or hub id")
    init.add_argument("--eval", metavar="FILE", help="held-out data (default: 10%% of DATA from 100 conversations)")
    init.add_argument("--base", metavar="M", help="base model dir or hub id (default: the embedded model)")
    init.add_argument("--output", metavar="FILE", help="the config to write (default: DATA's name with .yaml)")
    init.add_argument("--force", action="store_true", help="replace --output if it exists")
    _trust_arg(init)


def _adapter_and_model(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    if many:
        p.add_argument(
            "--adapter",
            dest="adapters",
            metavar="NAME=DIR",
            action="append",
            default=[],
            help="serve this adapter under NAME (repeatable; DIR alone is named after its run dir)",
        )
    else:
        p.add_argument("--adapter", metavar="DIR", help="a run's adapter/ dir (or the run dir)")
    p.add_argument("--base", action=Typed, metavar="M", help="base model dir or hub id (default: the adapter's base)")
    p.add_argument("--model", dest="base", action=Deprecated, use="--base", help=argparse.SUPPRESS)
    _trust_arg(p)
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights dtype (default: the dtype the adapter's run trained in; auto for adapters from elsewhere)",
    )


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when temperature > 0")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def _after_training_commands(sub: Any) -> None:
    ev = sub.add_parser("eval", help="eval loss, perplexity and generation metrics; base vs fine-tuned; HTML report")
    _adapter_and_model(ev)
    ev.add_argument("--data", metavar="FILE", help="eval data (default: the run's eval data)")
    ev.add_argument("--output", metavar="DIR", help="where eval.json, eval.md and report.html go (default: RUN/eval)")
    ev.add_argument("--limit", type=int, metavar="N", help="score at most N conversations")
    ev.add_argument("--batch-size", type=int, metavar="N", help="prompts per batch (default: the run's eval batch)")
    ev.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer (default: the run's setting)")
    ev.add_argument("--no-base", action="store_true", help="skip the base model's answers")

    merge = sub.add_parser("merge", help="merge an adapter into its full-precision base; checks logits parity")
    _adapter_and_model(merge)
    merge.add_argument("--output", metavar="DIR", required=True, help="directory for the merged model")
    merge.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="safetensors shard size")

    export = sub.add_parser(
        "export", help="a merged model as GGUF (f16 … q4_k_m) or GGUF + Ollama Modelfile; an adapter as GGUF LoRA"
    )
    export.add_argument(
        "format",
        choices=["gguf", "ollama", "gguf-lora"],
        help="gguf: one .gguf file; ollama: a dir with the GGUF and a Modelfile; gguf-lora: an adapter as GGUF",
    )
    merged = "gguf/ollama: a merged model dir (philora merge --output), or any full model dir"
    export.add_argument("--merged", action=Typed, metavar="DIR", help=merged)
    export.add_argument("--adapter", action=Typed, metavar="DIR", help="gguf-lora: the adapter (or its run dir)")
    base = "gguf-lora: the adapter's base, dir or hub id (default: its own); gguf/ollama: a base model dir as it is"
    export.add_argument("--base", action=Typed, metavar="M", help=base)
    base_gguf = "gguf-lora: check it on this base GGUF (default: an f16 GGUF of the base, written for the check)"
    export.add_argument("--base-gguf", action=Typed, metavar="FILE", help=base_gguf)
    # the last release's --model: a merged dir for gguf/ollama, the base for gguf-lora; export.command resolves it
    export.add_argument("--model", dest="old_model", action=Typed, help=argparse.SUPPRESS)
    export.add_argument("--output", metavar="PATH", required=True, help="the .gguf file (gguf) or a directory (ollama)")
    # any case: llama.cpp's own names are upper case (Q4_K_M); choices are checked after the lowering
    export.add_argument(
        "--type", default="f16", type=str.lower, choices=GGUF_TYPES, help="gguf/ollama: tensor type, in any case"
    )
    _trust_arg(export)

    chat = sub.add_parser("chat", help="chat in the terminal with streamed answers (/reset, /exit)")
    _adapter_and_model(chat)
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    chat.add_argument("--tools", metavar="FILE", help="offer these tools (a JSON list of OpenAI function schemas)")
    _generation_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server for the base model and adapters")
    _adapter_and_model(serve, many=True)
    serve.add_argument("--host", default="127.0.0.1", help="bind address; 127.0.0.1 takes this machine's clients only")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    serve.add_argument(
        "--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` (better: $PHILORA_API_KEY, not in `ps`)"
    )
    serve.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before 503")
    serve.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="cap on max_tokens")
    serve.add_argument(
        "--max-body-mb", type=float, default=4, metavar="MB", help="largest request body; larger ones get 413"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        help="positions (rows x prompt + answer) generated together; the queue holds 4 batches' worth "
        "(default: 16384 or the model's context, if longer)",
    )
    serve.add_argument(
        "--read-timeout", type=float, default=30, metavar="S", help="seconds for a request to arrive; then 408"
    )
    serve.add_argument(
        "--graceful-timeout",
        type=float,
        default=30,
        metavar="S",
        help="seconds the requests in progress get after SIGTERM; then they are cancelled",
    )

    push = sub.add_parser("push", help="upload an adapter or merged model with its model card to the Hugging Face Hub")
    push.add_argument("--adapter", action=Typed, metavar="DIR", help="a run dir (adapter/, run records) or an adapter")
    push.add_argument("--merged", action=Typed, metavar="DIR", help="a merged model dir (philora merge --output)")
    # the last release's positional DIR: export.push reads it as --adapter or --merged by what the dir holds
    push.add_argument("dir", nargs="?", help=argparse.SUPPRESS)
    push.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the model repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its own)")
    push.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created if missing; default main)")
    push.add_argument("--message", metavar="TEXT", help="the commit message")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes that would go up; no network")


# Commands that load no config here (sweep loads its own, per trial): each module's main(args) returns the exit status.
AFTER_TRAINING = {
    "init": "philora.preflight.starter",
    "sweep": "philora.sweep.command",
    "eval": "philora.eval.command",
    "merge": "philora.export.merge",
    "export": "philora.export.command",
    "chat": "philora.infer.chat",
    "serve": "philora.infer.serve",
    "push": "philora.export.push",
}


def run(args: argparse.Namespace) -> int:
    if args.command == "export" and args.format == "gguf-lora":  # an adapter, not a merged model
        return importlib.import_module("philora.export.lora_gguf").main(args)
    if args.command in AFTER_TRAINING:
        return importlib.import_module(AFTER_TRAINING[args.command]).main(args)
    from philora.config import dump_documented, load_config

    # flags that set a config value, named as typed in messages and in `philora config`'s origins
    from philora.flags import typed

    flags = [(flag, key, value) for flag, key, value in (
        ("--output", "training_config.output_dir", getattr(args, "output", None)),
        ("--fail-on-regression", "training_config.fail_on_regression", getattr(args, "fail_on_regression", None)),
        (typed(args, "model", "--model"), "model.name_or_path", getattr(args, "model", None))) if value]  # fmt: skip
    # `philora config` loads no model: it shows the file's trust_remote_code as it is (None: neither grant nor refuse)
    config = load_config(args.config, args.overrides, getattr(args, "trust_remote_code", None), flags)
    if args.command == "config":
        print(dump_documented(config, demo=args.config is None), end="")
        return 0
    if args.command == "check":
        from philora.model.load import without_bitsandbytes
        from philora.preflight.command import check
        from philora.train.trial import measure

        with without_bitsandbytes(config.model.quantization is None):  # as train: its import only logs noise here
            return check(config, measure if args.time else None, as_json=args.json)
    if args.command == "data":
        from philora.config.relative import require_data
        from philora.data.check import check
        from philora.model.load import CONFIG_KEY, load_tokenizer, named_by
        from philora.preflight.command import model_context

        # reading data pads nothing: no notice about the pad token before the report; a model that cannot load is
        # named by the flag typed (--base, or the old --model), else by the config key
        require_data("FILE", args.file)  # before the tokenizer loads: a mistyped path fails in a moment
        with named_by(typed(args, "model", CONFIG_KEY)):
            tokenizer = load_tokenizer(config.model, say_pad=False)
        return check(config, args.file, tokenizer, as_json=args.json, context=model_context(config))
    from philora.train.run import train
    from philora.train.verdict import Regressed

    try:
        train(config, resume=args.resume)
    except Regressed as e:  # for pipelines: the run finished and wrote everything, and made the model worse
        print(f"philora: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    commands = parser()
    args = commands.parse_args(argv)
    if args.command is None:
        commands.print_help()
        return 0
    progress.set_verbosity(getattr(args, "verbosity", progress.NORMAL))  # -q/-v, per command
    # peft calls a transformers method that v5 renamed; the warning is theirs, not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return run(args)
    except UserError as e:
        for problem in e.problems:
            print(f"philora: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("philora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
