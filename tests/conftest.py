"""Fixtures: one real conversion of the embedded model per session, and a tiny random Phi-3 beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

SAMPLE = Path(__file__).resolve().parent.parent / "philora" / "sample"
# merge and export in this process would fix glibc's mmap threshold for the whole session (philora/heap.py), and
# slow every training test after them by a quarter; test_merge's memory test runs a merge with it, on its own
os.environ["PHILORA_HEAP"] = "0"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session converts the embedded model afresh into its own cache: the real code path."""
    path = tmp_path_factory.mktemp("philora-cache")
    os.environ["PHILORA_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def embedded_dir(cache_dir: Path) -> Path:
    from philora.model import embedded

    return embedded.embedded_model_dir()


@pytest.fixture(scope="session")
def embedded_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model's tokenizer and chat template alone, read from its GGUF: tiny fixtures borrow it
    without paying for the model's conversion."""
    from philora.model import embedded

    path = tmp_path_factory.mktemp("embedded-tokenizer")
    embedded.gguf_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_phi3(embedded_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Phi-3 (GQA 4/2 heads) with the embedded model's tokenizer and chat template."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    path = tmp_path_factory.mktemp("tiny-phi3")
    config = Phi3Config(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of tiny_phi3 from elsewhere (peft's format, no run.json): r=2 on qkv_proj, B still zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["qkv_proj"])).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The first 24 training and 6 eval conversations of the sample dataset."""
    path = tmp_path_factory.mktemp("tiny-data")
    for name, n in (("train", 24), ("eval", 6)):
        lines = (SAMPLE / f"{name}.jsonl").read_text().splitlines()[:n]
        (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return path / "train.jsonl", path / "eval.jsonl"


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def phi3_style(embedded_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Phi-3 whose tokenizer has Phi-3's chat tokens (<|system|> <|user|> <|assistant|> <|end|>,
    right-stripping like Phi-3's), eos = pad = <|endoftext|> and an <unk>, and no chat template of its own."""
    from transformers import AddedToken, AutoTokenizer, Phi3Config, Phi3ForCausalLM

    path = tmp_path_factory.mktemp("phi3-style")
    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer)
    chat_tokens = [AddedToken(t, rstrip=True, special=True, normalized=False) for t in PHI3_CHAT_TOKENS]
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": chat_tokens,
            "unk_token": "<unk>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        }
    )
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(path)
    return path


PHI3_CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Phi-4-mini-instruct's chat template (its tokenizer_config.json) and its special tokens at their ids there.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + "
    "'<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_MINI_SPECIALS = {
    "<|endoftext|>": 199999,
    "<|endofprompt|>": 200018,
    "<|assistant|>": 200019,
    "<|end|>": 200020,
    "<|user|>": 200021,
    "<|system|>": 200022,
    "<|tool|>": 200023,
    "<|/tool|>": 200024,
    "<|tool_call|>": 200025,
    "<|/tool_call|>": 200026,
    "<|tool_response|>": 200027,
    "<|tag|>": 200028,
}


@pytest.fixture(scope="session")
def phi4_mini_tokenizer(embedded_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer shaped like Phi-4-mini-instruct's where it matters here: its chat template, and its chat and
    tool special tokens at their real ids (a 200k vocabulary: byte-level BPE borrowed from the embedded model,
    padded with unreachable entries up to id 199998)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(Tokenizer.from_file(str(embedded_tokenizer / "tokenizer.json")).to_str())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:  # SmolLM2's own specials become plain unreachable entries
        del vocab[added["content"]]
        vocab[f"<unused_{added['id']}>"] = added["id"]
    vocab.update({f"<pad_{i}>": i for i in range(len(vocab), min(PHI4_MINI_SPECIALS.values()))})
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in PHI4_MINI_SPECIALS.items()
    ]  # fmt: skip
    vocab.update({t: i for t, i in PHI4_MINI_SPECIALS.items()})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=PHI4_MINI_TEMPLATE,
    )
    path = tmp_path_factory.mktemp("phi4-mini-tokenizer")
    tokenizer.save_pretrained(path)
    return path


def pair_data(tmp_path: Path, tiny_data: tuple[Path, Path]) -> tuple[Path, Path]:
    """Pairs made from the tiny data by the script that makes the shipped preference sample."""
    from scripts.make_preference_data import pairs

    paths = []
    for source, seed in zip(tiny_data, (1, 2), strict=True):
        path = tmp_path / f"pairs-{source.name}"
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs(read_jsonl(source), seed)))
        paths.append(path)
    return paths[0], paths[1]


def tiny_config(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], **training: object) -> Path:
    settings = {
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "learning_rate": 0.01,
        "logging_steps": 2,
        "save_steps": 3,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "predict_with_generate": True,
        "generation_max_length": 8,
        "seed": 7,
        **training,
    }
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in settings.items())
    return write_yaml(
        tmp_path / "tiny.yaml",
        f"""
model: {{name_or_path: {tiny_phi3}, dtype: float32}}
data: {{train: {tiny_data[0]}, eval: {tiny_data[1]}, max_length: 512}}
peft_config: {{r: 4, lora_alpha: 8, lora_dropout: 0.1}}
training_config:
{lines}
""",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the real embedded model (its conversion alone takes ~40 s) belong to the slow tier."""
    for item in items:
        if "embedded_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


class ScriptedModel(torch.nn.Module):
    """A stand-in model for generate(): each answer is the next scripted one, one token a step (the only token
    with any probability) and then the end-of-turn token. It keeps every prompt it is given. One request at a time."""

    def __init__(self, encoder: Any) -> None:  # a ChatEncoder
        from transformers import Phi3Config

        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate() finds the device here
        vocab = max(encoder.tokenizer.get_vocab().values()) + 1  # ids may skip some (Phi-4-mini's do)
        self.config = Phi3Config(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.encoder = encoder
        self.answers: deque[list[int]] = deque()
        self.prompts: list[list[int]] = []
        self.steps: deque[int] = deque()
        self.cache: Any = None
        self.logits = torch.full((1, 1, vocab), -torch.inf)

    def script(self, text: str) -> None:
        self.answers.append([*self.encoder.tokenize([text])[0], self.encoder.end_of_turn_id])

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, **kwargs: Any) -> SimpleNamespace:
        if past_key_values is not self.cache:  # a fresh cache: generate() starts an answer
            assert input_ids.shape[0] == 1, "the scripted model answers one request at a time"
            self.cache = past_key_values
            self.prompts.append(input_ids[0].tolist())
            self.steps = deque(self.answers.popleft())
        logits = self.logits.clone()
        logits[0, -1, self.steps.popleft()] = 0.0  # probability 1, sampled or not
        return SimpleNamespace(logits=logits)


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any tokenizer, config or model load (or the embedded model's conversion) fails the test."""
    import transformers

    from philora.model import embedded

    def load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("loaded a model before checking its path")

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", load)
    monkeypatch.setattr(embedded, "embedded_model_dir", load)


def chromium() -> str:
    """Debian's headless Chromium (CI installs it and sets PHILORA_REQUIRE_CHROMIUM=1, so there it never skips)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("PHILORA_REQUIRE_CHROMIUM") == "1":
            pytest.fail("PHILORA_REQUIRE_CHROMIUM=1 but no chromium on PATH")
        pytest.skip("chromium is not installed")
    return path


def browse(page: Path, tmp: Path, *mode: str, fragment: str = "") -> str:
    """Run headless Chromium on a file (at `fragment`), with flags that keep it off the network (it hangs on lookups
    without them); its stdout."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}", *mode, page.as_uri() + fragment,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
