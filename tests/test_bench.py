"""bench/gpu.py runs end to end: the device run is one prepared command, so its code path is checked here on a
tiny model with Phi-3-mini's vocabulary and tokenizer layout, on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs a benchmark script end to end

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_gpu_bench_runs_both_sides_on_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(BENCH / "gpu.py"), "--tiny", "--steps", "1", "--rows", "16", "--length", "256",
               "--modes", "qlora", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "qlora: ratio philora / TRL" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["side"]) for r in results] == [("qlora", "philora"), ("qlora", "trl")]
    for r in results:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        # tokens/s is the tokens of the timed steps (after the warm-up one) over their time, from the recorded marks
        (t0, n0), (t1, n1) = r["marks"][0], r["marks"][-1]
        assert n1 > n0 and t1 > t0 and r["tokens_per_s"] == pytest.approx((n1 - n0) / (t1 - t0), rel=1e-9)
        # A random model over a 32064-word vocabulary starts near ln(32064) = 10.4.
        assert abs(r["losses"][0] - math.log(32064)) < 0.5
    assert results[0]["params"] == results[1]["params"]  # the same model, counted the same way


def test_the_bench_tokenizer_has_phi3_ids_and_template() -> None:
    sys.path.insert(0, str(BENCH))
    from gpu import build_tokenizer

    from philora.data.render import ChatEncoder

    tokenizer = build_tokenizer(32064)
    vocab = tokenizer.get_vocab()
    assert (vocab["<|end|>"], vocab["<|user|>"], vocab["<|assistant|>"], vocab["<|endoftext|>"]) == (
        32007, 32010, 32001, 32000,
    )  # fmt: skip
    encoder = ChatEncoder(tokenizer)
    sample = encoder.encode([{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"}])
    # Phi-3's template ends a conversation with <|endoftext|> after the last <|end|>. The answer and its <|end|>
    # are trained, not that <|endoftext|>, as with Phi-3's own tokenizer; the end of turn is found although this
    # placeholder vocabulary reads the encoder's probe answer as <unk>, a special token too.
    assert encoder.end_of_turn_id == 32007
    assert list(sample.input_ids) == [32010, 5, 6, 32007, 32001, 7, 8, 32007, 32000]
    assert [int(t) for t in sample.labels if t >= 0] == [7, 8, 32007]


def test_scaleout_bench_compares_an_engine_with_one_process(tmp_path: Path) -> None:
    """bench/scaleout.py is the prepared GPU check of FSDP and ZeRO; its code path runs here with DDP on 2 CPU
    processes, which must follow the one-process reference closely (bf16 weights: half-size batches round
    differently, so not bit for bit)."""
    out = tmp_path / "scaleout.json"
    command = [sys.executable, str(BENCH / "scaleout.py"), "--tiny", "--engines", "ddp", "--gpus", "2", "--steps", "2",
               "--length", "256", "--rows", "24", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["ddp"]
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert result["loss_rel"] < 1e-2 and result["peak_memory_mb"] > 0
    assert "ddp" in done.stdout and "loss rel" in done.stdout
