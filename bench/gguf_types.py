"""What each GGUF type keeps of a fine-tuned model, measured in llama.cpp: the demo adapter's table.

    .venv/bin/philora train                     # the demo run, out/demo (skip if it is there)
    .venv/bin/python bench/gguf_types.py [--run out/demo] [--types f16 q8_0 q5_k_m q4_k_m]

Merges the run's adapter, exports each type with `philora export gguf` (which verifies the file in llama.cpp and
writes export.json), then answers the run's held-out eval prompts in llama.cpp through the file's own chat
template, greedily, with the run's max_new_tokens. Prints per type: file size, top-1 agreement and largest
|Δlogit| on the export's parity prompts, exact match of the answers against the references, and how many answers
are identical to transformers' answers in the run's eval.json; then the same for the adapter as GGUF LoRA
(`philora export gguf-lora`) applied to an f16 GGUF of the base. Everything goes to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="out/demo", help="a finished run dir with adapter/ and eval.json")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q5_k_m", "q4_k_m"])
    args = parser.parse_args()
    run = Path(args.run)
    evaluation = json.loads((run / "eval.json").read_text())
    samples = evaluation["samples"]
    max_new = evaluation["settings"]["max_new_tokens"]
    philora = [sys.executable, "-m", "philora"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        merged = Path(folder) / "merged"
        subprocess.run([*philora, "merge", "--adapter", str(run), "--output", str(merged)], check=True)
        for qtype in args.types:
            path = Path(folder) / f"{qtype}.gguf"
            command = [*philora, "export", "gguf", "--merged", str(merged), "--output", str(path), "--type", qtype]
            subprocess.run(command, check=True)
            record = json.loads(path.with_suffix(".export.json").read_text())
            answers = answer_all(path, None, samples, max_new)
            rows.append((qtype, record, *scores(answers, samples)))
        # The adapter alone as GGUF LoRA, on an f16 GGUF of the base, against the merged model's f16 file.
        base, lora = Path(folder) / "base-f16.gguf", Path(folder) / "lora.gguf"
        subprocess.run([*philora, "export", "gguf", "--base", base_dir(run), "--output", str(base)], check=True)
        command = [*philora, "export", "gguf-lora", "--adapter", str(run), "--base-gguf", str(base)]
        command += ["--output", str(lora)]
        subprocess.run(command, check=True)
        record = json.loads(lora.with_suffix(".export.json").read_text())
        answers = answer_all(base, lora, samples, max_new)
        rows.append(("f16+lora", {**record, "bytes": base.stat().st_size + record["bytes"]}, *scores(answers, samples)))
    transformers_exact = evaluation["after"]["exact_match"]
    print(f"\n{len(samples)} held-out prompts of {run}; transformers (fp32) exact match {transformers_exact:.1%}")
    print(f"{'type':8} {'MB':>7} {'top-1':>7} {'max|Δ|/scale':>13} {'exact':>7} {'same as transformers':>21}")
    for qtype, record, exact, same in rows:
        parity = record["parity"]
        print(
            f"{qtype:8} {record['bytes'] / 1e6:7.1f} {parity['top1_agreement']:7.1%} {parity['relative']:13.2e} "
            f"{exact:7.1%} {same:>14}/{len(samples)}"
        )
    return 0


def answer_all(path: Path, lora: Path | None, samples: list[dict], max_new: int) -> list[str]:
    from philora.export import llamacpp

    with llamacpp.loaded(path, 2048, lora) as model:
        return [llamacpp.answer(model, s["prompt"], max_new)[0] for s in samples]


def scores(answers: list[str], samples: list[dict]) -> tuple[float, int]:
    """(exact match against the references, answers identical to transformers')."""
    from philora.eval.metrics import score

    exact = score(answers, [s["reference"] for s in samples])["exact_match"]
    return exact, sum(a.strip() == s["after"].strip() for a, s in zip(answers, samples, strict=True))


def base_dir(run: Path) -> str:
    from philora.infer.adapters import read_adapter
    from philora.model.load import model_source

    return model_source(read_adapter(run).model)


if __name__ == "__main__":
    sys.exit(main())
