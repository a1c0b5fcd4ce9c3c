"""Preference pairs from the sample dataset, for dpo and orpo: `philora/sample/preference-{train,eval}.jsonl`.

Each conversation of the sample data becomes one pair: its turns before the last answer are the prompt, the
reference answer is chosen, and a plausible wrong answer is rejected, one of four kinds in turn. They are the
mistakes the models of the demo make: the embedded model before training echoes the message, and after the
demo's SFT its wrong answers mostly fill a field the text does not give, or copy a value with a slip.
- swapped: two fields' values exchanged (a name in the company field and the other way round);
- filled: a field that is null given another field's value (where none is null, a value left out instead);
- miscopied: a value with two neighbouring characters exchanged;
- echo: the last user message repeated back.

With --answers, a conversation the demo's SFT model answered wrongly gets that answer as rejected instead: its own
mistakes, the pairs DPO learns most from (on-policy). The answers come from `philora eval`, which writes every
prompt's answer to eval.json; the shipped pairs were made with the demo's adapter on a 2-core AMD EPYC (fp32):

    philora eval --adapter out/demo/adapter --data philora/sample/train.jsonl --output out/answers-train --no-base
    philora eval --adapter out/demo/adapter --data philora/sample/eval.jsonl --output out/answers-eval --no-base
    python scripts/make_preference_data.py --answers out/answers-train/eval.json out/answers-eval/eval.json

Without --answers every pair gets a made-up wrong answer.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SAMPLE = Path(__file__).resolve().parent.parent / "philora" / "sample"


def wrong_answer(answer: str, question: str, kind: int, rng: random.Random) -> str:
    """A wrong answer of the given kind; one that cannot be made of this answer falls through to the next kind."""
    fields: dict[str, Any] = json.loads(answer)
    filled = [k for k, v in fields.items() if v is not None]
    empty = [k for k, v in fields.items() if v is None]
    if kind == 0 and len(filled) >= 2:
        a, b = rng.sample(filled, 2)
        fields[a], fields[b] = fields[b], fields[a]
        return json.dumps(fields, ensure_ascii=False)
    if kind <= 1 and filled:
        if empty:
            fields[rng.choice(empty)] = fields[rng.choice(filled)]
        else:
            fields[rng.choice(filled)] = None
        return json.dumps(fields, ensure_ascii=False)
    long_values = [k for k in filled if len(fields[k]) >= 4]
    if kind <= 2 and long_values:
        key = rng.choice(long_values)
        value = fields[key]
        at = rng.randrange(1, len(value) - 2)
        if value[at] != value[at + 1]:
            fields[key] = value[:at] + value[at + 1] + value[at] + value[at + 2 :]
            return json.dumps(fields, ensure_ascii=False)
    return question


def pairs(rows: list[dict[str, Any]], seed: int, answers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One pair per row; `answers` maps a prompt (as `key` writes it) to a model's answer, used as rejected when
    it is wrong and not empty."""
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        messages = row["messages"]
        prompt, chosen = messages[:-1], messages[-1]["content"]
        rejected = wrong_answer(chosen, prompt[-1]["content"], i % 4, rng)  # drawn always: the same rng sequence
        own = (answers or {}).get(key(prompt), "").strip()
        out.append({"prompt": prompt, "chosen": chosen, "rejected": own if own and own != chosen else rejected})
    return out


def key(prompt: list[dict[str, Any]]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def read_answers(path: Path) -> dict[str, str]:
    """Each sample's answer from a `philora eval` eval.json (the fine-tuned model's: "after")."""
    return {key(s["prompt"]): s["after"] for s in json.loads(path.read_text())["samples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", nargs=2, type=Path, metavar=("TRAIN_EVAL_JSON", "EVAL_EVAL_JSON"))
    args = parser.parse_args()
    for n, (split, seed) in enumerate((("train", 1), ("eval", 2))):
        rows = [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        answers = read_answers(args.answers[n]) if args.answers else None
        made = pairs(rows, seed, answers)
        with (SAMPLE / f"preference-{split}.jsonl").open("w") as f:
            for pair in made:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        own = sum(answers is not None and answers.get(key(p["prompt"])) == p["rejected"] for p in made)
        print(f"{split}: {len(made)} pairs, {own} with the model's own wrong answer as rejected")


if __name__ == "__main__":
    main()
