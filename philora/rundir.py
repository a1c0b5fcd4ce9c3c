"""A run directory: the names of the files `philora train` writes, in one place, and how its records are read
back (metrics.jsonl, drawn as loss.png) by the run itself, by a resumed run and by `philora eval`.

A run dir's manifest.json lists what philora writes there, written before anything else, so that starting a run
over an old one removes what philora wrote and nothing else: a file a person put into the dir (or into its eval/,
runs/, checkpoints/ or adapter/) stays. An entry is a path relative to the run dir, `*` matching within one name;
an entry ending in `/` is a folder philora writes whole (a checkpoint), removed whole. A dir with no manifest is a
philora run only when it holds a run.json or a checkpoint (runs from before the manifest), then read with the names
a run writes, adapter/ taken whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from philora import __version__

MANIFEST = "manifest.json"
WRITER = "philora"  # the manifest's "written_by": a manifest.json of someone else's is not ours to act on


@dataclass(frozen=True)
class RunDir:
    """The files of one run under `root` (training_config.output_dir)."""

    root: Path

    @property
    def adapter(self) -> Path:  # the trained adapter, PEFT format, with the tokenizer
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:  # checkpoints/step-N/
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:  # one JSON line per logged step or evaluation
        return self.root / "metrics.jsonl"

    @property
    def record(self) -> Path:  # run.json: config, versions, data, dtype, results
        return self.root / "run.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def lora_init(self) -> Path:  # PiSSA/OLoRA: the adapter as initialised, to convert the trained one
        return self.root / "lora-init"

    @property
    def base_answers(self) -> Path:  # the base model's answers to the eval prompts, before training
        return self.root / "base-answers.json"

    @property
    def data_report(self) -> Path:  # the data report in full (train prints it in one line)
        return self.root / "data-report.txt"

    def reference(self, split: str) -> Path:  # dpo: the reference log-probabilities of the train or eval pairs
        return self.root / f"reference-{split}.npy"

    @property
    def tensorboard(self) -> Path:
        return self.root / "runs"

    @property
    def eval_output(self) -> Path:  # where `philora eval` writes for this run
        return self.root / "eval"

    @property
    def manifest(self) -> Path:  # what philora writes here: see the module's docstring
        return self.root / MANIFEST

    @property
    def staged_adapter(self) -> Path:  # the adapter being written, renamed to adapter/ once whole
        return self.root / ".tmp-adapter"

    def run_names(self) -> list[str]:
        """What `philora train` may write here (and `philora eval` into eval/), as the manifest lists it; the
        adapter's files are added as they are written. Temporary names too: a kill can leave them."""
        references = [self.reference("train"), self.reference("eval")]
        files = [
            self.metrics,
            self.record,
            self.loss_plot,
            self.base_answers,
            self.data_report,
            *references,
            *(folder / name for folder in (self.root, self.eval_output) for name in EVAL_FILES),
            self.tensorboard / "events.out.tfevents.*",  # TensorBoard's, when logging_dir is the default
            # written under these names, then renamed
            self.metrics.with_suffix(".tmp"),
            self.loss_plot.with_suffix(".tmp.png"),
            *(r.with_suffix(".tmp.npy") for r in references),
            self.manifest.with_suffix(".json.tmp"),
            self.adapter / "README.md.tmp",
        ]
        # checkpoints/step-N and its temporary names (train/checkpoint.py), and the adapter's set aside while a
        # new one replaces it (train/durable.py put_in_place)
        folders = [self.checkpoints / "step-*", self.checkpoints / ".tmp-*", self.lora_init, self.staged_adapter,
                   self.root / f".tmp-old-{self.adapter.name}"]  # fmt: skip
        return [p.relative_to(self.root).as_posix() + ("/" if p in folders else "") for p in (*files, *folders)]

    def recorded(self) -> list[str] | None:
        """The names philora writes here per the manifest; for a run from before the manifest, the names a run
        writes (its adapter/ whole); None when this dir is not a philora run."""
        try:
            manifest = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("written_by") == WRITER:
            files = manifest.get("files")
            own = set(self.run_names())
            return [name for name in files if self._ours(name, own)] if isinstance(files, list) else []
        try:
            record = json.loads(self.record.read_text())
        except (OSError, ValueError):
            record = None
        legacy = isinstance(record, dict) and "training_config" in record.get("config", {})
        if legacy or any(self.checkpoints.glob("step-*/state.json")):
            return [*self.run_names(), f"{self.adapter.name}/"]
        return None

    def _ours(self, name: object, own: set[str]) -> bool:
        """Whether a manifest entry is one philora writes: one of `own` (run_names) or a plain name inside adapter/.
        A run dir travels, its manifest with it: an entry like `*` or `../x` must never make philora remove a file."""
        if not isinstance(name, str):
            return False
        parts = PurePosixPath(name).parts
        in_adapter = len(parts) == 2 and parts[0] == self.adapter.name and not set("*?[]") & set(parts[1])
        return name in own or (in_adapter and parts[1] not in ("..", "."))

    def written(self, names: list[str] | None = None) -> list[Path]:
        """What philora wrote here that is still there: the files and whole folders `names` (default: the
        recorded ones) match. Never a symlink: philora writes none."""
        found: list[Path] = []
        root = self.root.resolve()
        for name in (self.recorded() or []) if names is None else names:
            whole = name.endswith("/")
            # never through a symlinked folder either: it may point anywhere
            found += [p for p in self.root.glob(name.rstrip("/")) if not p.is_symlink()
                      and (p.is_dir() if whole else p.is_file())
                      and p.parent.resolve() == root.joinpath(*p.relative_to(self.root).parts[:-1])]  # fmt: skip
        folders = [p for p in found if p.is_dir()]
        return sorted({p for p in found if not any(f in p.parents for f in folders)})

    def remove_written(self) -> list[Path]:
        """Remove what philora wrote here, then the folders that held it if nothing else is left in them; returns
        what was removed."""
        names = self.recorded() or []
        removed = self.written(names)
        for path in removed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for name in names:
            parent = (self.root / name.rstrip("/")).parent
            if parent != self.root and parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
                parent.rmdir()
        return removed

    def unrecorded(self, folder: Path) -> list[Path]:
        """The entries of `folder` (inside this run dir) that philora did not write: a person's."""
        names = self.recorded() or []
        return [p for p in sorted(folder.iterdir()) if not any(_matches(p.relative_to(self.root), n) for n in names)]

    def write_manifest(self, names: Iterable[str]) -> None:
        """manifest.json listing `names`, replaced in one rename (a kill leaves the old one or the new one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = {
            "written_by": WRITER,
            "version": __version__,
            "about": "what philora wrote in this folder; starting a run over it removes these and nothing else",
            "files": list(dict.fromkeys(names)),
        }
        tmp = self.manifest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.manifest)

    def add_to_manifest(self, names: Iterable[str]) -> None:
        self.write_manifest([*(self.recorded() or self.run_names()), *names])


def _matches(path: PurePosixPath | Path, name: str) -> bool:
    """Whether a path relative to a run dir is the manifest entry `name` or inside a folder it names whole."""
    pattern = PurePosixPath(name.rstrip("/")).parts
    parts = PurePosixPath(path).parts
    within = name.endswith("/") and len(parts) >= len(pattern)
    return (within or len(parts) == len(pattern)) and all(map(fnmatchcase, parts, pattern))


# What an evaluation writes (beside the run's other files, or into RUN/eval).
EVAL_FILES = ("eval.json", "eval.md", "report.html")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut by a kill mid-write is left out (a resumed run rewrites the
    log without it); a bad line anywhere else is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step and eval loss per evaluation, and below them the answers' scores of the evaluations
    during training (exact match, ROUGE-L ..., reward accuracy) when there are any, written to `path` as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, not at import, to leave other users alone
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    scores = {name: [(r["step"], r[name]) for r in records if name in r] for name in score_names(records)}
    fig, axes = plt.subplots(2 if scores else 1, 1, figsize=(7, 6.5 if scores else 4), dpi=110, squeeze=False,
                             sharex=True)  # fmt: skip
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#2f6db5")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d9822b")
    ax.set_ylabel("cross-entropy per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        below = axes[1][0]
        for name, points in scores.items():
            steps, values = zip(*points, strict=True)
            below.plot(steps, [100 * v for v in values], "o-", label=name.removeprefix("eval_"), markersize=3)
        below.set_ylabel("held-out score, %")
        below.grid(alpha=0.3)
        below.legend(fontsize="small")
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def score_names(records: list[dict[str, Any]]) -> list[str]:
    """The shares (0 to 1) the evaluations logged: answers' scores and dpo/orpo's reward accuracy."""
    skip = ("eval_loss", "eval_ppl", "eval_logps/", "eval_rewards/chosen", "eval_rewards/rejected",
            "eval_rewards/margins")  # fmt: skip
    names = {k for r in records for k in r if k.startswith("eval_") and not k.startswith(skip)}
    return sorted(names)
