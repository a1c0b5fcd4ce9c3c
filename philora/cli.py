"""The `philora` command: parse, load the config, call one function. User mistakes exit 2 without a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from philora import __version__
from philora.errors import UserError


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="philora", description="LoRA/QLoRA fine-tuning for Phi-3 and causal LMs.")
    p.add_argument("--version", action="version", version=f"philora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune with LoRA (no --config: the embedded demo on CPU)")
    _config_args(train)
    train.add_argument("--output", metavar="DIR", help="output directory (training_config.output_dir)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="DIR",
        help="continue from the newest checkpoint in the output dir, or from DIR",
    )

    config = sub.add_parser("config", help="print the resolved config, every field with its meaning")
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
    check.add_argument("--model", metavar="M", help="tokenizer of this model (model.name_or_path)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from philora.config import dump_documented, load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"training_config.output_dir={args.output}")
    if getattr(args, "model", None):
        overrides.append(f"model.name_or_path={args.model}")
    config = load_config(args.config, overrides)
    if args.command == "config":
        print(dump_documented(config), end="")
        return 0
    if args.command == "data":
        from philora.data.check import check

        return check(config, args.file, as_json=args.json)
    from philora.train import train

    train(config, resume=args.resume)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
