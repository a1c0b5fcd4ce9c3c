"""`philora push --adapter DIR | --merged DIR --repo owner/name`: an adapter or a merged model to the Hugging Face
Hub, in one commit. (The last release's `philora push DIR` still works, read as --adapter or --merged by what DIR
holds, with a warning.)

What goes up:
- --adapter, a run dir (run.json and adapter/): the adapter's files at the top of the repo, where peft and
  transformers look for them, and beside them the run's records that the card cites: run.json, eval.json, eval.md;
- --adapter, a run's adapter/ (or any peft adapter dir), or --merged, a merged model dir (one with merge.json;
  refused when it records a failed parity check): the dir's files.
Never checkpoints/, __pycache__/, or hidden files and folders (.cache/, .git/).

The model card: a README.md someone wrote goes up as it is. When there is none, or it is peft's empty template, or
it is philora's own card unedited, a card is made afresh (export/card.py) whose load instructions name the repo;
the dir itself is not touched.

The files and their sizes are listed before anything is sent; `--dry-run` stops there and needs neither a token
nor the network. The upload is one `create_commit` of exactly the listed files (not `upload_folder`, which picks
files by pattern), so the list is the upload. The repo is created if missing (private with `--private`; an existing
repo keeps its visibility), and so is the `--revision` branch. The token is huggingface_hub's own: $HF_TOKEN, else
the one `hf auth login` saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from philora.errors import UserError
from philora.export.card import CARD, MERGE_RECORD, is_hub_id, model_card, replaceable
from philora.flags import typed, warn_deprecated
from philora.rundir import EVAL_FILES, RunDir

SKIPPED_DIRS = ("checkpoints", "__pycache__")
RUN_RECORDS = ("run.json", EVAL_FILES[0], EVAL_FILES[1])  # run.json, eval.json, eval.md
DEFAULT_MESSAGE = "Upload with philora push"


@dataclass(frozen=True)
class Upload:
    """One file of the commit: its path in the repo, and a local file or the bytes of a card made for the repo."""

    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def main(args: argparse.Namespace) -> int:
    repo = check_repo(args.repo)
    path, flag, kind = what_to_push(args)
    uploads = plan(path, repo, flag, kind)
    token = None if args.dry_run else require_token()
    print(listing(uploads, repo, args.private, args.revision))
    if args.dry_run:
        print("philora: dry run: nothing uploaded", file=sys.stderr)
        return 0
    url = push(uploads, repo, token, args.private, args.revision, args.message or DEFAULT_MESSAGE)
    print(f"philora: pushed {len(uploads)} files to {repo}: {url}", file=sys.stderr)
    return 0


def check_repo(repo: str) -> str:
    if not is_hub_id(repo):
        raise UserError(
            f"--repo {repo}: not a Hub model repo id; give owner/name (letters, digits, '-', '_', '.'), e.g. "
            "--repo your-name/phi3-contacts"
        )
    return repo


def require_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(
            "push: no Hugging Face token (HF_TOKEN is unset and `hf auth login` saved none); run `hf auth login` "
            "or set HF_TOKEN to a token with write access (--dry-run needs none)"
        )
    return token


def what_to_push(args: argparse.Namespace) -> tuple[Path, str, str]:
    """(the dir, the flag as typed, "adapter" or "merged"): --adapter DIR or --merged DIR, or the old positional DIR
    read as one of them by what it holds."""
    given = [(typed(args, dest, f"--{dest}"), getattr(args, dest), dest) for dest in ("adapter", "merged")]
    given = [g for g in given if g[1] is not None]
    if args.dir is not None:
        path = Path(args.dir).expanduser()
        kind = "merged" if (path / MERGE_RECORD).is_file() else "adapter"
        given.append(("DIR", args.dir, kind))
        if len(given) == 1:
            warn_deprecated("push DIR", f"push --{kind} DIR")
    if len(given) != 1:
        both = f"{' and '.join(flag for flag, _, _ in given)}: " if given else ""
        raise UserError(
            f"push: {both}give one: --adapter DIR (a run dir or its adapter/) or --merged DIR (a merged model)"
        )
    flag, value, kind = given[0]
    return Path(value).expanduser(), flag, kind


def plan(path: Path, repo: str, flag: str = "--adapter", kind: str = "adapter") -> list[Upload]:
    """The files to commit for the adapter or merged model (`kind`) at `path`, named `flag` as the user typed it;
    sorted by their path in the repo."""
    give = "give a run dir or its adapter/" if kind == "adapter" else "give a `philora merge --output` dir"
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such directory; {give}")
    run = RunDir(path)
    adapter = (path / "adapter_config.json").is_file()
    if kind == "adapter" and (run.adapter / "adapter_config.json").is_file():
        model_dir = run.adapter
        records = [Upload(name, path / name) for name in RUN_RECORDS if (path / name).is_file()]
    elif (kind == "adapter" and adapter) or (kind == "merged" and (path / MERGE_RECORD).is_file()):
        model_dir, records = path, []
    elif kind == "merged" and (adapter or (run.adapter / "adapter_config.json").is_file()):
        raise UserError(f"{flag} {path}: is an adapter, not a merged model; push it with --adapter {path}")
    elif kind == "adapter" and (path / MERGE_RECORD).is_file():
        raise UserError(f"{flag} {path}: is a merged model, not an adapter; push it with --merged {path}")
    else:
        holds = "no adapter (adapter_config.json, or adapter/ in a run dir)" if kind == "adapter" else (
            "no merged model (merge.json)"
        )  # fmt: skip
        raise UserError(f"{flag} {path}: holds {holds}; {give}")
    check_merge(model_dir, flag)
    files = [Upload(p.relative_to(model_dir).as_posix(), p) for p in model_files(model_dir)]
    return sorted([card_upload(model_dir, repo), *files, *records], key=lambda u: u.path_in_repo)


def check_merge(model_dir: Path, flag: str) -> None:
    record = model_dir / MERGE_RECORD
    if record.is_file() and not json.loads(record.read_text()).get("passed", False):
        raise UserError(
            f"{flag} {model_dir}: merge.json records a merge that failed its parity check (passed: false); do not "
            "publish it: merge again (philora merge) and push the new dir"
        )


def model_files(model_dir: Path) -> list[Path]:
    """The dir's files but its README.md (see card_upload), checkpoints, caches and hidden ones."""

    def kept(path: Path) -> bool:
        parts = path.relative_to(model_dir).parts
        return not any(p.startswith(".") or p in SKIPPED_DIRS for p in parts) and parts != (CARD,)

    return sorted(p for p in model_dir.rglob("*") if p.is_file() and kept(p))


def card_upload(model_dir: Path, repo: str) -> Upload:
    """The README.md as written, unless there is none or it is a template or philora's own card: then one for
    the repo."""
    readme = model_dir / CARD
    if readme.is_file() and not replaceable(readme.read_text(encoding="utf-8", errors="replace")):
        return Upload(CARD, readme)
    return Upload(CARD, model_card(model_dir, repo).encode())


def listing(uploads: list[Upload], repo: str, private: bool, revision: str | None) -> str:
    """What would go where: the repo, then each file with its size in bytes, then the total."""
    visibility = "private" if private else "public"
    lines = [f"{repo} (created {visibility} if missing), branch {revision or 'main'}:"]
    for u in uploads:
        note = "  (model card made for this repo)" if isinstance(u.source, bytes) else ""
        lines.append(f"{u.size:>15,}  {u.path_in_repo}{note}")
    lines.append(f"{sum(u.size for u in uploads):>15,}  in {len(uploads)} files")
    return "\n".join(lines)


def push(uploads: list[Upload], repo: str, token: str, private: bool, revision: str | None, message: str) -> str:
    """Create the repo (and branch) if missing and commit the files; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    # huggingface_hub's HTTP errors derive from its HTTP client's base error, as the client's connection errors do:
    # catching that base catches both, whichever client this huggingface_hub version uses.
    client_error = HfHubHTTPError.__mro__[1]
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(u.path_in_repo, u.source if isinstance(u.source, bytes) else str(u.source)) for u in uploads
    ]
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        return api.create_commit(repo, operations, commit_message=message, revision=revision).commit_url
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"--repo {repo}: the Hub refused the push ({status}: {reason}); check that the token may write to "
            f"{repo.split('/')[0]} (`hf auth login`, HF_TOKEN)"
        ) from None
    except client_error as e:
        raise UserError(
            f"--repo {repo}: cannot reach the Hub at {constants.ENDPOINT} ({e}); check the network, or HF_ENDPOINT"
        ) from None
    except ValueError as e:  # huggingface_hub's answer to a README.md whose metadata the Hub rejects
        if "Invalid metadata in README.md" not in str(e):
            raise
        problems = " ".join(line.strip("- ") for line in str(e).splitlines()[1:] if line.strip())
        raise UserError(
            f"--repo {repo}: the Hub rejects the metadata of README.md ({problems}); fix its front matter"
        ) from None
