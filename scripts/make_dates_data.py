"""A user's own data, as a newcomer brings it: a CSV of date conversions with columns `question` and `answer`.

Half the rows ask for an ISO date written out ("2019-11-03" → "November 3, 2019"), half the other way round, in a
few phrasings. The embedded model answers almost none of them in the expected form before training; a few minutes of
LoRA on a CPU teach it. The first-config story of the tests (tests/test_first_config.py) and the newcomer transcript
(scripts/newcomer_transcript.py) use it:

    python scripts/make_dates_data.py OUT_DIR [--train 200] [--eval 40] [--seed 0]

writes OUT_DIR/dates.csv and OUT_DIR/dates-eval.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import random
from pathlib import Path

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
TO_WORDS = ("Write {iso} as a date in words.", "Convert {iso} to a written date.", "How is {iso} written out?")
TO_ISO = ("Write {words} in ISO format.", "Convert {words} to YYYY-MM-DD.", "What is {words} as an ISO date?")


def rows(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` (question, answer) pairs over days of 1950-2049, alternating the two directions."""
    start = datetime.date(1950, 1, 1)
    out = []
    for i in range(count):
        day = start + datetime.timedelta(days=rng.randrange(100 * 365))
        iso, words = day.isoformat(), f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
        if i % 2 == 0:
            out.append((rng.choice(TO_WORDS).format(iso=iso), words))
        else:
            out.append((rng.choice(TO_ISO).format(words=words), iso))
    return out


def write(path: Path, pairs: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("question", "answer"))
        writer.writerows(pairs)


def make(out: Path, train: int = 200, eval: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write the train and eval CSVs (no question in both) and return their paths."""
    rng = random.Random(seed)
    pairs = list(dict.fromkeys(rows(2 * (train + eval), rng)))  # distinct questions only
    if len(pairs) < train + eval:
        raise SystemExit(f"could not draw {train + eval} distinct dates")
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "dates.csv", out / "dates-eval.csv"
    write(paths[0], pairs[:train])
    write(paths[1], pairs[train : train + eval])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for dates.csv and dates-eval.csv")
    parser.add_argument("--train", type=int, default=200, help="training rows")
    parser.add_argument("--eval", type=int, default=40, help="held-out rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in make(args.out, args.train, args.eval, args.seed):
        print(path)


if __name__ == "__main__":
    main()
