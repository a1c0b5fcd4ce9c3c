"""philora export: GGUF files that llama.cpp loads to the same tokens, chat template and (within the type's floors)
the same logits as transformers, for the Phi-3, Llama, Mistral and Qwen2 layouts and long-context Phi configs;
llama.cpp's own quantized types; adapters as GGUF LoRA; an Ollama Modelfile whose template re-creates the chat
template; refusals of what cannot be exported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import PHI3_CHAT_TOKENS, SAMPLE

from philora import cli
from philora.errors import UserError
from philora.export import gguf as gguf_export
from philora.export import vocab as gguf_vocab
from philora.export.ollama import chat_shape


def read_metadata(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], int]]]:
    """The GGUF's metadata (tokens listed in full) and {tensor: (shape, ggml type)}."""
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    return metadata, {t.name: (t.shape, t.ggml_type) for t in GgufHeader.from_file(str(path)).tensors}


def run_export(*args: str) -> int:
    return cli.main(["export", *args])


@pytest.fixture(scope="module")
def embedded_ollama(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("ollama") / "smollm2"
    return out, run_export("ollama", "--merged", str(embedded_dir), "--output", str(out), "--type", "f16")


def test_f16_gguf_reads_back_as_the_embedded_model(embedded_ollama: tuple[Path, int]) -> None:
    out, rc = embedded_ollama
    assert rc == 0
    record = json.loads((out / "export.json").read_text())
    assert record["passed"] and record["tokenizer_identical"] and record["type"] == "f16"
    assert record["verified_with"].startswith("llama.cpp (llama-cpp-python 0.3.36)")
    parity = record["parity"]
    assert 0 < parity["relative"] <= 1e-2 and parity["top1_agreement"] == 1.0 and parity["positions"] > 60
    assert record["tokenizer_model"] == "gpt2" and record["tokenizer_pre"] == "gpt-2"
    # The base model answers the parity prompts the same in llama.cpp, through the file's own chat template, and
    # llama.cpp stops at <|im_end|> by itself where transformers does.
    assert record["answers_identical"] == record["answers_stopped_alike"] == 3
    assert ["stop", "stop"] in [a["finish"] for a in record["answers"]]


def test_gguf_metadata_follows_llama_cpp_phi3(embedded_dir: Path, embedded_ollama: tuple[Path, int]) -> None:
    from transformers import AutoTokenizer

    metadata, tensors = read_metadata(embedded_ollama[0] / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    expected = {
        "general.architecture": "phi3",
        "general.file_type": 1,
        "phi3.block_count": 30,
        "phi3.context_length": 8192,
        "phi3.rope.scaling.original_context_length": 8192,
        "phi3.embedding_length": 576,
        "phi3.feed_forward_length": 1536,
        "phi3.attention.head_count": 9,
        "phi3.attention.head_count_kv": 3,
        "phi3.rope.dimension_count": 64,
        "phi3.rope.freq_base": 100000.0,
        "phi3.attention.sliding_window": 0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.convert_tokens_to_ids("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "tokenizer.ggml.eot_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    assert {k: metadata.get(k) for k in expected} == expected
    assert metadata["phi3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and metadata["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert metadata["tokenizer.ggml.merges"] == 48900  # counted, not read
    # The dir is named ...-phi3-...; llama.cpp would then strip the newline after <|im_start|>user.
    assert "phi3" not in metadata["general.name"].lower()
    assert tensors["blk.0.attn_qkv.weight"][0] == (9 * 64 + 2 * 3 * 64, 576)  # [q; k; v]
    assert tensors["blk.0.ffn_up.weight"][0] == (2 * 1536, 576)  # [gate; up]
    assert "output.weight" not in tensors and len(tensors) == 2 + 30 * 6  # tied head: token_embd serves


def test_ollama_modelfile_recreates_the_chat_template(embedded_ollama: tuple[Path, int]) -> None:
    text = (embedded_ollama[0] / "Modelfile").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == "FROM ./model.gguf"
    template = (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
    )
    assert f'TEMPLATE """{template}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_ctx 4096" in lines


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece BPE tokenizer with byte fallback like Phi-3's, with its chat tokens (rstrip) and template:
    405 tokens."""
    import sentencepiece
    from tokenizers import normalizers
    from transformers import AddedToken, AutoTokenizer, LlamaTokenizer

    from philora.data.templates import PHI3_TEMPLATE

    path = tmp_path_factory.mktemp("spm")
    rows = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()[:200]]
    (path / "text.txt").write_text("\n".join(m["content"] for r in rows for m in r.get("messages", [])))
    sentencepiece.SentencePieceTrainer.train(
        input=str(path / "text.txt"), model_prefix=str(path / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    tokenizer = LlamaTokenizer.from_pretrained(path)
    backend = tokenizer.backend_tokenizer  # Phi-3's tokenizer.json: ▁ from the normalizer, no pre-tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    chat = [AddedToken(t, rstrip=True, special=True, normalized=False) for t in PHI3_CHAT_TOKENS]
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "additional_special_tokens": chat})
    tokenizer.chat_template = PHI3_TEMPLATE
    tokenizer.save_pretrained(path / "saved")
    # (With a phi3 config.json beside it, transformers loads it as its tokenizer.json says, as it does Phi-3's.)
    config = json.loads((path / "saved/tokenizer_config.json").read_text())
    (path / "saved/tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    loaded = AutoTokenizer.from_pretrained(path / "saved")
    assert len(loaded) == 405 and loaded.backend_tokenizer.pre_tokenizer is None
    return path / "saved"


def tiny_spm_phi3(tokenizer_dir: Path, path: Path, qkv_std: float | None = None, **config: object) -> Path:
    """A 2-layer random Phi-3 (64 wide, so Q8_0 blocks fit) on a small tokenizer; 448 embedding rows by default (43
    unused with the SentencePiece one). `qkv_std` makes attention sharp, so that positions (rotary) matter."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(path)
    settings = {"vocab_size": 448, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "max_position_embeddings": 512}  # fmt: skip
    phi3 = Phi3Config(num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **{**settings, **config})  # fmt: skip
    torch.manual_seed(0)
    model = Phi3ForCausalLM(phi3)
    for layer in model.model.layers if qkv_std else []:
        torch.nn.init.normal_(layer.self_attn.qkv_proj.weight, std=qkv_std)
    model.save_pretrained(path)
    return path


def test_sentencepiece_phi3_tokenizer_exports_as_llama_vocab(
    spm_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_spm_phi3(spm_tokenizer, tmp_path / "model")
    out = tmp_path / "ollama"
    assert run_export("ollama", "--merged", str(model), "--output", str(out), "--type", "q8_0") == 0
    assert "GGUF q8_0 in llama.cpp" in capsys.readouterr().err
    record = json.loads((out / "export.json").read_text())
    assert record["passed"] and record["tokenizer_identical"] and record["tokenizer_model"] == "llama"
    assert record["name"] == "phi3-model"  # llama.cpp strips the newline after <|user|> only for phi3 names
    metadata, _ = read_metadata(out / "model.gguf")
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert len(tokens) == 448 and tokens[447] == "[PAD447]" and types[447] == gguf_vocab.UNUSED
    assert tokens[3] == "<0x00>" and types[3] == gguf_vocab.BYTE and types[0] == gguf_vocab.UNKNOWN
    assert types[tokens.index("<|end|>")] == gguf_vocab.CONTROL
    assert metadata["tokenizer.ggml.eot_token_id"] == tokens.index("<|end|>")
    assert metadata["tokenizer.ggml.add_space_prefix"] is True
    text = (out / "Modelfile").read_text()
    assert '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}' in text
    assert 'PARAMETER stop "<|end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "SYSTEM" not in text and "PARAMETER num_ctx 512" in text


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_byte_level_tokenizer_splitting_digits_exports_as_smollm(tmp_path: Path) -> None:
    """SmolLM2's own tokenizer.json splits digits one by one before GPT-2's regex: llama.cpp's `smollm`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rows = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()[:200]]
    backend.train_from_iterator([m["content"] for r in rows for m in r.get("messages", [])], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    tiny_spm_phi3(model, model, vocab_size=640)
    out = tmp_path / "digits.gguf"
    assert run_export("gguf", "--merged", str(model), "--output", str(out)) == 0
    record = json.loads(out.with_suffix(".export.json").read_text())
    assert record["passed"] and record["tokenizer_identical"] and record["tokenizer_pre"] == "smollm"
    metadata, _ = read_metadata(out)
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.merges"] == len(
        json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    )
    assert metadata["tokenizer.ggml.eot_token_id"] == metadata["tokenizer.ggml.eos_token_id"] == 2


@pytest.mark.parametrize(("scheme", "difference"), [("first", "after a special token"), ("always", "with a space")])
def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(
    spm_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], scheme: str, difference: str
) -> None:
    """Llama-2-style tokenizer.json files split with Metaspace, whose ▁ rules llama.cpp cannot reproduce."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    model = tiny_spm_phi3(spm_tokenizer, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.backend_tokenizer.normalizer = None
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=False)
    tokenizer.save_pretrained(model)
    assert run_export("gguf", "--merged", str(model), "--output", str(tmp_path / "m.gguf")) == 2
    err = capsys.readouterr().err
    assert "Metaspace" in err and difference in err
    assert not (tmp_path / "m.gguf").exists()


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0}
# Attention sharp enough that positions matter; an original context of 256, as llama.cpp pads its context to 256.
LONG_CONTEXT = {"qkv_std": 0.15, "original_max_position_embeddings": 256, "max_position_embeddings": 1024}


@pytest.mark.parametrize(
    ("shape", "config", "rope_dims"),
    [
        ("Phi-3-mini-128k / Phi-3.5-mini: full rotary", {}, 16),
        ("Phi-4-mini: partial rotary, tied head, sliding_window", {"partial_rotary_factor": 0.75,
         "tie_word_embeddings": True, "sliding_window": 512}, 12),
    ],
)  # fmt: skip
def test_longrope_models_agree_with_llama_cpp_past_the_original_context(
    spm_tokenizer: Path, tmp_path: Path, shape: str, config: dict, rope_dims: int
) -> None:
    """Long factors 1..4.5 (short ones near 1) make positions past the original 256 differ sharply from short-factor
    ones: llama.cpp must read the factors, the attention factor, the original context and the rotary dimensions."""
    half = rope_dims // 2
    rope = {**LONGROPE, "long_factor": [1.0 + i / 2 for i in range(half)], "short_factor": [1.0 + i / 20 for i in
            range(half)], "partial_rotary_factor": config.pop("partial_rotary_factor", 1.0)}  # fmt: skip
    model = tiny_spm_phi3(spm_tokenizer, tmp_path / "model", rope_parameters=rope, **LONG_CONTEXT, **config)
    out = tmp_path / "long.gguf"
    assert run_export("gguf", "--merged", str(model), "--output", str(out)) == 0, shape
    record = json.loads(out.with_suffix(".export.json").read_text())
    long = record["long_context"]
    assert record["passed"] and long["from"] == 256 and long["positions"] == 64 and long["relative"] <= 1e-2
    metadata, tensors = read_metadata(out)
    assert (
        metadata["phi3.rope.dimension_count"] == rope_dims
        and metadata["phi3.rope.scaling.original_context_length"] == 256
    )
    assert metadata["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    assert tensors["rope_factors_long.weight"] == ((half,), 0) and tensors["rope_factors_short.weight"] == ((half,), 0)
    assert metadata["phi3.attention.sliding_window"] == config.get("sliding_window", 0)


def test_long_context_check_catches_wrong_long_factors(
    spm_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check past the original context is not vacuous: writing the short factors as the long ones fails it."""
    rope = {
        **LONGROPE,
        "long_factor": [1.0 + i / 2 for i in range(8)],
        "short_factor": [1.0 + i / 20 for i in range(8)],
    }
    model = tiny_spm_phi3(spm_tokenizer, tmp_path / "model", rope_parameters=rope, **LONG_CONTEXT)
    real = gguf_export.rope_tensors

    def short_as_long(config: object) -> list:
        tensors = real(config)
        return [(name, tensors[1][1] if "long" in name else data, kind) for name, data, kind in tensors]

    monkeypatch.setattr(gguf_export, "rope_tensors", short_as_long)
    out = tmp_path / "wrong.gguf"
    assert run_export("gguf", "--merged", str(model), "--output", str(out)) == 1
    record = json.loads(out.with_suffix(".export.json").read_text())
    assert record["parity"]["relative"] <= 1e-2 and record["long_context"]["relative"] > 0.1


def test_verification_catches_a_wrong_tensor_and_a_wrong_tokenizer(
    spm_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_spm_phi3(spm_tokenizer, tmp_path / "model")
    real_encode, real_vocab = gguf_export.encode, gguf_vocab._sentencepiece_vocab

    def scaled(tensor: torch.Tensor, qtype: str):  # every matrix 5% too large
        return real_encode(tensor * 1.05 if tensor.ndim == 2 else tensor, qtype)

    monkeypatch.setattr(gguf_export, "encode", scaled)
    assert run_export("gguf", "--merged", str(model), "--output", str(tmp_path / "a.gguf")) == 1
    record = json.loads((tmp_path / "a.export.json").read_text())
    assert not record["passed"] and record["tokenizer_identical"] and record["parity"]["relative"] > 1e-2

    def reversed_merges(*args: object):  # the merge priorities backwards
        vocab = real_vocab(*args)
        vocab.scores = [-s if t == gguf_vocab.NORMAL else s for s, t in zip(vocab.scores, vocab.types, strict=True)]
        return vocab

    monkeypatch.setattr(gguf_export, "encode", real_encode)
    monkeypatch.setattr(gguf_vocab, "_sentencepiece_vocab", reversed_merges)
    assert run_export("gguf", "--merged", str(model), "--output", str(tmp_path / "b.gguf")) == 1
    record = json.loads((tmp_path / "b.export.json").read_text())
    assert not record["tokenizer_identical"] and record["tokenizer_mismatch"]


def test_an_unsupported_architecture_and_bad_paths_are_refused(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=4).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_config.json").write_text("{}")
    (tmp_path / "taken.gguf").write_text("")
    cases = [
        (
            ["gguf", "--merged", str(tmp_path / "gpt2"), "--output", str(tmp_path / "x.gguf")],
            "a gpt2 model; GGUF export supports Phi-3/Phi-3.5/Phi-4-mini (phi3), Llama and Mistral (llama), Qwen2",
        ),
        (["gguf-lora", "--model", str(tiny_phi3), "--output", str(tmp_path / "x.gguf")], "give --adapter DIR"),
        (["gguf", "--adapter", str(tmp_path), "--output", str(tmp_path / "x.gguf")], "give --merged DIR"),
        (["gguf", "--merged", str(tmp_path / "adapter"), "--output", str(tmp_path / "x.gguf")], "merge it first"),
        (["gguf", "--merged", str(tiny_phi3), "--output", str(tmp_path / "x.bin")], "ending in .gguf"),
        (["gguf", "--merged", str(tiny_phi3), "--output", str(tmp_path / "taken.gguf")], "exists"),
        (["ollama", "--merged", str(tiny_phi3), "--output", str(tmp_path)], "not an empty directory"),
    ]
    for args, message in cases:
        assert run_export(*args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.gguf").exists()


def test_pre_tokenizer_names_and_refusals() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert gguf_vocab.pre_tokenizer_name(byte_level, None) == "gpt-2"
    assert gguf_vocab.pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}, None) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}|\s+"}, "behavior": "Isolated", "invert": False}
    unknown = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    with pytest.raises(UserError, match=r"none that llama\.cpp and transformers both know"):
        gguf_vocab.pre_tokenizer_name(unknown, None)
    with pytest.raises(UserError, match="adds a prefix space"):
        gguf_vocab.pre_tokenizer_name({**byte_level, "add_prefix_space": True}, None)
    with pytest.raises(UserError, match="with a NFKC normalizer"):
        gguf_vocab.pre_tokenizer_name(byte_level, {"type": "NFKC"})
    assert gguf_vocab.pre_tokenizer_name(byte_level, {"type": "NFC"}) == "gpt-2"  # Qwen2's, as llama.cpp converts it


def test_gguf_name_tells_llama_cpp_whether_chat_tokens_strip_whitespace() -> None:
    assert gguf_vocab.gguf_name("merged", rstrip_specials=True) == "phi3-merged"
    assert gguf_vocab.gguf_name("Phi-3-mini-merged", rstrip_specials=True) == "Phi-3-mini-merged"
    assert gguf_vocab.gguf_name("smollm2-phi3-v1", rstrip_specials=False) == "smollm2-phi_3-v1"


def test_a_template_without_a_per_role_shape_is_refused_for_ollama() -> None:
    from jinja2 import Template

    # Each user turn is numbered: no fixed prefix per role can say that.
    numbered = Template(
        "{% for m in messages %}{% if m.role == 'user' %}[{{ loop.index }}] {{ m.content }}<|end|>\n"
        "{% else %}{{ m.role }}: {{ m.content }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(UserError, match="cannot be written as an Ollama TEMPLATE"):
        chat_shape(lambda messages, gen: numbered.render(messages=messages, add_generation_prompt=gen), "<|end|>")
