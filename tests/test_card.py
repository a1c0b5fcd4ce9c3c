"""Model cards and `philora push`: a tiny run's adapter and its merge get a README.md whose metadata the Hub's own
parser reads back and whose body holds the run's numbers and load instructions that work; push lists exactly what
it sends, refuses bad repos, missing tokens and failed merges, and commits those files to a stand-in of the Hub."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from conftest import tiny_config
from huggingface_hub import ModelCard, constants

from philora import cli
from philora.eval.table import format_value, metric_rows
from philora.export import card, push
from philora.infer.adapters import read_adapter

REPO = "ana/tiny-contacts"


@pytest.fixture(scope="module")
def tiny_run(tiny_phi3: Path, tiny_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 6-step run of the tiny Phi-3, with its held-out evaluation."""
    tmp = tmp_path_factory.mktemp("card-run")
    out = tmp / "run"
    assert cli.main(["train", "--config", str(tiny_config(tmp, tiny_phi3, tiny_data)), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_merged(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run merged, its adapter named by a path relative to the directory the merge ran in."""
    out = tmp_path_factory.mktemp("card-merge") / "merged"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_run.parent)
        assert cli.main(["merge", "--adapter", tiny_run.name, "--output", str(out)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path, **model: Any) -> Path:
    """The run's records and adapter in a new dir, with run.json's model section changed by `model`."""
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((target / "run.json").read_text())
    record["config"]["model"].update(model)
    (target / "run.json").write_text(json.dumps(record))
    return target


def metadata(text: str) -> dict[str, Any]:
    return ModelCard(text).data.to_dict()


def test_training_replaces_peft_template_with_a_card_of_the_run(tiny_run: Path) -> None:
    text = (tiny_run / "adapter/README.md").read_text()
    assert card.PEFT_TEMPLATE not in text and card.replaceable(text)
    meta = metadata(text)
    # The base is a local dir: the Hub takes only ids as base_model, and a dir with no card names no license.
    assert meta == {"library_name": "peft", "pipeline_tag": "text-generation", "tags": ["philora", "lora", "sft"]}
    evaluation = json.loads((tiny_run / "eval.json").read_text())
    for row in metric_rows(evaluation):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row['label']} |"))
        assert all(format_value(row["kind"], row[r]) in line for r in ("before", "after")), line
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["data"]["fingerprint"] in text and "train: 24 conversations" in text
    assert f"| steps | {run['steps']}, " in text and "| LoRA | r 4, alpha 8, dropout 0.1" in text
    for instruction in (
        "PeftModel.from_pretrained(base, ",
        f"philora chat --adapter {tiny_run / 'adapter'}",
        "philora export gguf-lora --adapter",
        "llama-cli -m base.gguf --lora adapter.gguf",
        "ADAPTER $PWD/adapter.gguf",
    ):
        assert instruction in text, instruction


def test_the_cards_python_snippet_loads_the_adapter_and_answers(tiny_run: Path) -> None:
    text = (tiny_run / "adapter/README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert printed.getvalue().strip()


def test_base_model_and_license_come_from_what_is_known(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded = copy_run(tiny_run, tmp_path / "embedded", name_or_path=None)
    meta = metadata(card.model_card(embedded / "adapter"))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "re-laid as `Phi3ForCausalLM`" in card.model_card(embedded / "adapter")

    local_base = tmp_path / "base"
    local_base.mkdir()
    (local_base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    meta = metadata(card.model_card(copy_run(tiny_run, tmp_path / "local", name_or_path=str(local_base)) / "adapter"))
    assert "base_model" not in meta and meta["license"] == "mit"

    hub = copy_run(tiny_run, tmp_path / "hub", name_or_path="microsoft/Phi-3-mini-4k-instruct", quantization="4bit")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    meta = metadata(card.model_card(hub / "adapter"))
    assert meta["base_model"] == "microsoft/Phi-3-mini-4k-instruct" and "license" not in meta  # nothing cached
    assert meta["tags"] == ["philora", "qlora", "sft"]
    cached = tmp_path / "hub-cache/models--microsoft--Phi-3-mini-4k-instruct"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs/main").write_text("0" * 40)
    (cached / f"snapshots/{'0' * 40}").mkdir(parents=True)
    (cached / f"snapshots/{'0' * 40}/README.md").write_text("---\nlicense: mit\n---\n")
    assert metadata(card.model_card(hub / "adapter"))["license"] == "mit"


def test_a_hub_dataset_is_named_and_a_missing_evaluation_said(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    record = json.loads((run / "run.json").read_text())
    record["data"]["sources"][0]["source"] = "ana/contacts:train"
    record["generation_eval"] = None
    (run / "run.json").write_text(json.dumps(record))
    for name in ("eval.json", "eval.md", "report.html"):
        (run / name).unlink()
    text = card.model_card(run / "adapter")
    assert metadata(text)["datasets"] == ["ana/contacts"] and "- train: `ana/contacts:train`" in text
    assert "Not evaluated" in text and "| metric |" not in text


def test_a_preference_run_without_generations_shows_its_pairs(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    record = json.loads((run / "run.json").read_text())
    record["config"]["training_config"]["method"] = "dpo"
    pairs = {"pairs": 6, "loss": 0.61, "rewards/accuracies": 0.875, "rewards/margins": 0.4374}
    record["generation_eval"] = {"preference": pairs}
    (run / "run.json").write_text(json.dumps(record))
    (run / "eval.json").unlink()
    text = card.model_card(run / "adapter")
    assert metadata(text)["tags"] == ["philora", "lora", "dpo"]
    assert "held-out pairs (6): dpo loss 0.6100, reward accuracy 87.5%, reward margin 0.437." in text
    assert "| metric |" not in text and "Not evaluated" not in text


def test_merge_writes_a_card_of_the_merged_model(tiny_run: Path, tiny_merged: Path) -> None:
    text = (tiny_merged / "README.md").read_text()
    assert metadata(text) == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["philora", "lora", "sft"],
    }
    merge = json.loads((tiny_merged / "merge.json").read_text())
    assert f"{merge['parity']['relative']:.1e} of the logit scale" in text
    evaluation = json.loads((tiny_run / "eval.json").read_text())
    for row in metric_rows(evaluation):
        assert f"| {row['label']} | {format_value(row['kind'], row['before'])} | " in text
    assert f'AutoModelForCausalLM.from_pretrained("{tiny_merged}")' in text
    assert f"philora export gguf --merged {tiny_merged} --output model.gguf" in text
    assert "PeftModel" not in text
    run = json.loads((tiny_run / "run.json").read_text())
    assert merge["adapter"] == str(tiny_run / "adapter") and run["data"]["fingerprint"] in text
    assert card.model_card(tiny_merged) == text  # made again from elsewhere, it still finds the run


def kind_of(directory: Path) -> str:
    """The flag that names `directory` to push: --merged for a merge's output, --adapter for a run or adapter."""
    return "--merged" if (directory / "merge.json").is_file() else "--adapter"


def dry_run(capsys: pytest.CaptureFixture[str], directory: Path, *args: str) -> dict[str, int]:
    """{path in repo: size} from `philora push --dry-run`, checking the total line."""
    assert cli.main(["push", kind_of(directory), str(directory), "--repo", REPO, "--dry-run", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{REPO} (created ")
    rows = [re.fullmatch(r"\s*([\d,]+)  (\S+)(  \(model card made for this repo\))?", line) for line in lines[1:-1]]
    sizes = {m.group(2): int(m.group(1).replace(",", "")) for m in rows if m}
    assert len(sizes) == len(rows)
    assert lines[-1].split() == [f"{sum(sizes.values()):,}", "in", str(len(sizes)), "files"]
    return sizes


def test_push_dry_run_of_a_run_lists_exactly_its_adapter_and_records(
    tiny_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run touched the network")

    monkeypatch.setattr("huggingface_hub.HfApi.__init__", offline)
    monkeypatch.setattr("huggingface_hub.get_token", offline)
    sizes = dry_run(capsys, tiny_run)
    adapter = tiny_run / "adapter"
    expected = {p.name: p.stat().st_size for p in adapter.iterdir() if p.name != "README.md"}
    expected |= {name: (tiny_run / name).stat().st_size for name in ("run.json", "eval.json", "eval.md")}
    expected["README.md"] = len(card.model_card(adapter, REPO).encode())
    assert sizes == expected
    assert dry_run(capsys, adapter).keys() == expected.keys() - {"run.json", "eval.json", "eval.md"}


def test_push_keeps_a_written_card_and_replaces_peft_template(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = copy_run(tiny_run, tmp_path) / "adapter"
    (adapter / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n")
    assert dry_run(capsys, adapter)["README.md"] == (adapter / "README.md").stat().st_size
    edited = card.model_card(adapter).replace("# run", "# My run")
    (adapter / "README.md").write_text(edited)
    assert dry_run(capsys, adapter)["README.md"] == len(edited.encode())
    (adapter / "README.md").write_text(f"# Model Card\n\n{card.PEFT_TEMPLATE}\n")
    assert dry_run(capsys, adapter)["README.md"] == len(card.model_card(adapter, REPO).encode())


def test_push_dry_run_of_a_merged_dir_and_refusal_of_a_failed_merge(
    tiny_merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sizes = dry_run(capsys, tiny_merged)
    assert sizes.pop("README.md") == len(card.model_card(tiny_merged, REPO).encode())
    assert sizes == {p.name: p.stat().st_size for p in tiny_merged.iterdir() if p.name != "README.md"}
    failed = tmp_path / "merged"
    shutil.copytree(tiny_merged, failed)
    record = json.loads((failed / "merge.json").read_text())
    (failed / "merge.json").write_text(json.dumps({**record, "passed": False}))
    assert cli.main(["push", "--merged", str(failed), "--repo", REPO, "--dry-run"]) == 2
    assert "failed its parity check (passed: false)" in capsys.readouterr().err


@pytest.mark.parametrize("repo", ["tiny-contacts", "ana/tiny/contacts", "ana/tiny contacts", "ana/tiny--x"])
def test_a_bad_repo_id_exits_2_with_one_line(tiny_run: Path, capsys: pytest.CaptureFixture[str], repo: str) -> None:
    assert cli.main(["push", "--adapter", str(tiny_run), "--repo", repo, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--repo {repo}: not a Hub model repo id; give owner/name" in err


def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_without_a_token_exits_2_naming_the_fix(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_token(monkeypatch, tmp_path)
    assert cli.main(["push", "--adapter", str(tiny_run), "--repo", REPO]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "no Hugging Face token" in captured.err and "hf auth login" in captured.err and "HF_TOKEN" in captured.err


class StandInHub(ThreadingHTTPServer):
    """The Hub's endpoints that create_repo, create_branch and create_commit call, keeping what they receive. Its
    preupload answer asks for every file inline in the commit (the Hub's way for small files), so no LFS or Xet
    storage is involved: what is tested is philora's use of the API, not huggingface_hub's large-file transfer."""

    token = "hf_stand_in"

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict[str, Any]] = {}
        self.commits: list[dict[str, Any]] = []


class HubHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def do_GET(self) -> None:
        self.reply(404, {"error": "not part of the stand-in"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        path = unquote(urlparse(self.path).path)
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            self.server.repos.setdefault(repo, {"visibility": payload.get("visibility"), "branches": {"main": {}}})
            return self.reply(200, {"url": f"{self.server.url}/{repo}"})
        if path == "/api/validate-yaml":
            return self.validate(json.loads(body)["content"])
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if match is None or match.group(1) not in self.server.repos:
            return self.reply(404, {"error": "Repository not found"})
        repo, action, revision = match.groups()
        branches = self.server.repos[repo]["branches"]
        if action == "branch":
            branches.setdefault(revision, dict(branches["main"]))
            return self.reply(200, {})
        if revision not in branches:
            return self.reply(404, {"error": f"Invalid rev id: {revision}"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})  # fmt: skip
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"}
        branches[revision].update(files)
        self.server.commits.append({"repo": repo, "revision": revision, "summary": items[0]["value"]["summary"],
                                    "files": files})  # fmt: skip
        return self.reply(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})

    def validate(self, readme: str) -> None:
        """The Hub's rule that metadata names models and datasets by id, not by a local path."""
        meta = ModelCard(readme).data.to_dict()
        named = [(key, value) for key in ("base_model", "datasets") for value in _as_list(meta.get(key))]
        errors = [{"message": f'"{key}" with value "{value}" is not valid. Use a model id from https://hf.co/models.'}
                  for key, value in named if not card.is_hub_id(value)]  # fmt: skip
        self.reply(400 if errors else 200, {"errors": errors, "warnings": []})

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[StandInHub]:
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    no_token(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", StandInHub.token)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


def test_push_commits_exactly_the_listed_files_to_the_hub(
    tiny_run: Path, hub: StandInHub, capsys: pytest.CaptureFixture[str]
) -> None:
    planned = {u.path_in_repo: u for u in push.plan(tiny_run, REPO, "--adapter", "adapter")}
    args = ["push", "--adapter", str(tiny_run), "--repo", REPO, "--private", "--revision", "contacts-v1"]
    args += ["--message", "tiny run"]
    assert cli.main(args) == 0
    assert hub.repos[REPO]["visibility"] == "private"
    (commit,) = hub.commits
    assert commit["revision"] == "contacts-v1" and commit["summary"] == "tiny run"
    assert commit["files"].keys() == planned.keys()
    for path, upload in planned.items():
        expected = upload.source if isinstance(upload.source, bytes) else upload.source.read_bytes()
        assert commit["files"][path] == expected, path
    pushed_card = commit["files"]["README.md"].decode()
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in pushed_card and str(tiny_run) not in pushed_card
    assert f"hf download {REPO} --local-dir tiny-contacts" in pushed_card
    assert hub.repos[REPO]["branches"]["main"] == {}
    assert f"pushed {len(planned)} files to {REPO}" in capsys.readouterr().err


def test_a_push_the_hub_refuses_exits_2(
    tiny_run: Path, hub: StandInHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert cli.main(["push", "--adapter", str(tiny_run), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert f"--repo {REPO}: the Hub refused the push (401" in err and "Traceback" not in err
    assert hub.repos == {}


def test_a_card_whose_metadata_the_hub_rejects_exits_2(
    tiny_run: Path, tmp_path: Path, hub: StandInHub, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = copy_run(tiny_run, tmp_path) / "adapter"
    (adapter / "README.md").write_text(f"---\nbase_model: {tmp_path}/base\n---\n# mine\n")
    assert cli.main(["push", "--adapter", str(adapter), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert f'the Hub rejects the metadata of README.md ("base_model" with value "{tmp_path}/base"' in err
    assert hub.commits == []


def test_an_adapter_of_the_embedded_model_from_elsewhere_loads_on_this_machines_copy(tmp_path: Path) -> None:
    adapter = tmp_path / "downloaded"
    adapter.mkdir()
    base = "/home/someone/.cache/philora/embedded/smollm2-135m-instruct-phi3-v1"
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    assert read_adapter(adapter).model.name_or_path is None
