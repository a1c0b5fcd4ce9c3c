"""Fixtures: one real conversion of the embedded model per session, and a tiny random Phi-3 beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SAMPLE = Path(__file__).resolve().parent.parent / "philora" / "sample"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session converts the embedded model afresh into its own cache: the real code path."""
    path = tmp_path_factory.mktemp("philora-cache")
    os.environ["PHILORA_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def embedded_dir(cache_dir: Path) -> Path:
    from philora import embedded

    return embedded.embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_phi3(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(path)
    return path


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
def phi3_style(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Phi-3 whose tokenizer has Phi-3's chat tokens (<|system|> <|user|> <|assistant|> <|end|>,
    right-stripping like Phi-3's), eos = pad = <|endoftext|> and an <unk>, and no chat template of its own."""
    from transformers import AddedToken, AutoTokenizer, Phi3Config, Phi3ForCausalLM

    path = tmp_path_factory.mktemp("phi3-style")
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
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
