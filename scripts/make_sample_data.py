#!/usr/bin/env python3
"""Generate philora's sample chat dataset: contact extraction into fixed JSON.

Each user message is a short free-text note that mentions one person; the
assistant replies with exactly one line of JSON::

    {"name": "...", "company": "...", "city": "...", "email": "..."}

Fields not stated in the text are null, and every non-null value appears in
the text verbatim. The eval split uses first names, last names and companies
that never occur in train.

Usage:
    python scripts/make_sample_data.py           # (re)write the two files
    python scripts/make_sample_data.py --check   # exit 1 if files are stale

Stdlib only and fully deterministic (fixed seed, no set iteration).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

SEED = 1729
OUT_DIR = Path(__file__).resolve().parent.parent / "philora" / "sample"
EVAL_FRACTION = 0.15  # share of each name/company list reserved for eval
NULL_RATE = 0.2  # per optional field
COMPANY_EMAIL_RATE = 0.7  # email on the company domain when a company is known

# (shape, has_system_prompt) -> number of rows
TRAIN_SHAPES: dict[tuple[str, bool], int] = {
    ("single", False): 216,
    ("single", True): 54,
    ("multi", False): 43,
    ("multi", True): 29,
    ("correction", False): 11,
    ("correction", True): 7,
}
EVAL_SHAPES: dict[tuple[str, bool], int] = {
    ("single", True): 60,
    ("multi", True): 16,
    ("correction", True): 4,
}

from sample_vocab import (  # noqa: E402 - the script's own directory is on sys.path
    BLURBS,
    CITIES,
    COMPANIES,
    COMPANY_TLDS,
    CORRECTIONS,
    DAYS,
    DEPTS,
    DIETS,
    EVENTS,
    FEMALE_FIRST,
    FIELD_RE,
    FOLLOWUPS,
    FWD_OPENERS,
    GREETINGS,
    HOBBIES,
    ISSUES,
    LAST_NAMES,
    MALE_FIRST,
    NOISE,
    OPTIONAL_FIELDS,
    PERSONAL_DOMAINS,
    PREFIXES,
    QUOTES,
    ROLES,
    SEPARATORS,
    SIGNOFFS,
    SOURCES,
    SYSTEM_PROMPTS,
    TEMPLATES,
    TIMES,
    TOPICS,
    Part,
)

# --------------------------------------------------------------------------
# People and text
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    female: list[str]
    male: list[str]
    last: list[str]
    companies: list[str]


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    female: bool
    company: str | None
    city: str | None
    email: str | None

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def answer(self) -> str:
        record = {"name": self.name, "company": self.company, "city": self.city, "email": self.email}
        return json.dumps(record, ensure_ascii=False)


def split_pools(rng: random.Random) -> tuple[Pool, Pool]:
    """Reserve EVAL_FRACTION of each name/company list for eval only."""

    def split(items: list[str]) -> tuple[list[str], list[str]]:
        shuffled = rng.sample(items, len(items))
        k = round(len(items) * EVAL_FRACTION)
        return shuffled[k:], shuffled[:k]

    parts = [split(items) for items in (FEMALE_FIRST, MALE_FIRST, LAST_NAMES, COMPANIES)]
    return Pool(*(p[0] for p in parts)), Pool(*(p[1] for p in parts))


def slug(text: str) -> str:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", plain.lower())


def company_domain(company: str) -> str:
    key = slug(company)
    return f"{key}.{COMPANY_TLDS[zlib.crc32(key.encode()) % len(COMPANY_TLDS)]}"


def make_email(rng: random.Random, first: str, last: str, domain: str) -> str:
    f, la = slug(first), slug(last)
    styles = [f"{f}.{la}", f"{f[0]}{la}", f"{f}_{la}", f"{f}-{la}", f"{f[0]}.{la}", f"{f}{la[0]}"]
    # Bare first names only on company domains; personal ones often carry digits.
    styles.append(f"{f}{la}{rng.randint(1, 99)}" if domain in PERSONAL_DOMAINS else f)
    return f"{rng.choice(styles)}@{domain}"


def pick_email(rng: random.Random, first: str, last: str, company: str | None) -> str:
    use_company = company is not None and rng.random() < COMPANY_EMAIL_RATE
    domain = company_domain(company) if use_company else rng.choice(PERSONAL_DOMAINS)
    return make_email(rng, first, last, domain)


class NullDeck:
    """Decides which optional fields are null: exactly NULL_RATE per block of 10."""

    BLOCK = [True] * round(10 * NULL_RATE) + [False] * round(10 * (1 - NULL_RATE))

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[str, list[bool]] = {f: [] for f in OPTIONAL_FIELDS}

    def is_null(self, field: str) -> bool:
        queue = self.queues[field]
        if not queue:
            queue.extend(self.rng.sample(self.BLOCK, len(self.BLOCK)))
        return queue.pop()


def make_person(rng: random.Random, pool: Pool, deck: NullDeck) -> Person:
    female = rng.random() < 0.5
    first = rng.choice(pool.female if female else pool.male)
    last = rng.choice(pool.last)
    company = None if deck.is_null("company") else rng.choice(pool.companies)
    city = None if deck.is_null("city") else rng.choice(CITIES)
    email = None if deck.is_null("email") else pick_email(rng, first, last, company)
    return Person(first, last, female, company, city, email)


def lower_role(role: str) -> str:
    return " ".join(w if w.isupper() else w.lower() for w in role.split())


def with_article(role_lc: str) -> str:
    if role_lc.startswith("head of"):
        return f"the {role_lc}"
    return ("an " if role_lc[0] in "aeiou" else "a ") + role_lc


def fill_values(rng: random.Random, p: Person) -> dict[str, str | None]:
    role = rng.choice(ROLES)
    role_lc = lower_role(role)
    noise, noise2 = rng.sample(NOISE, 2)
    event, topic, day = rng.choice(EVENTS), rng.choice(TOPICS), rng.choice(DAYS)
    he = "she" if p.female else "he"
    return {
        "name": p.name,
        "first": p.first,
        "company": p.company,
        "city": p.city,
        "email": p.email,
        "Role": role,
        "role_lc": role_lc,
        "a_role": with_article(role_lc),
        "he": he,
        "He": he.capitalize(),
        "his": "her" if p.female else "his",
        "him": "her" if p.female else "him",
        "noise": noise,
        "noise2": noise2,
        "noise_lc": noise.lower(),
        "event": event,
        "event_lc": event.lower(),
        "EVENT": event.upper(),
        "topic": topic,
        "Topic": topic.capitalize(),
        "day": day,
        "day_lc": day.lower(),
        "time": rng.choice(TIMES),
        "dept": rng.choice(DEPTS),
        "diet": rng.choice(DIETS),
        "blurb": rng.choice(BLURBS),
        "greet": rng.choice(GREETINGS),
        "signoff": rng.choice(SIGNOFFS),
        "issue": rng.choice(ISSUES),
        "source": rng.choice(SOURCES),
        "hobby": rng.choice(HOBBIES),
        "quote": rng.choice(QUOTES),
        "fwd_open": rng.choice(FWD_OPENERS),
        "ticket": str(rng.randint(10000, 99999)),
        "order": f"A-{rng.randint(1000, 9999)}",
        "ep": str(rng.randint(12, 180)),
        "year": str(rng.randint(1998, 2020)),
    }


def render(template: tuple[Part, ...], values: dict[str, str | None]) -> str:
    def usable(option: str) -> bool:
        return all(values[f] is not None for f in FIELD_RE.findall(option) if f in OPTIONAL_FIELDS)

    out = []
    for part in template:
        options = (part,) if isinstance(part, str) else part
        out.append(next((o.format(**values) for o in options if usable(o)), ""))
    return "".join(out)


def _alternation(items: list[str]) -> re.Pattern[str]:
    ordered = sorted(items, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(s) for s in ordered) + r")\b")


CITY_RE = _alternation(CITIES)
COMPANY_RE = _alternation(COMPANIES)
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def check_text(text: str, p: Person) -> None:
    """The text must state exactly the non-null fields, verbatim, and nothing else."""
    found = {
        "city": set(CITY_RE.findall(text)),
        "company": set(COMPANY_RE.findall(text)),
        "email": set(EMAIL_RE.findall(text)),
    }
    expected = {"city": p.city, "company": p.company, "email": p.email}
    for field, value in expected.items():
        if found[field] != ({value} if value else set()):
            raise ValueError(f"{field} mismatch ({found[field]} vs {value!r}) in:\n{text}")
    if p.name not in text:
        raise ValueError(f"name {p.name!r} missing in:\n{text}")
    if not all(ord(c) < 256 for c in text):
        raise ValueError(f"non-Latin-1 character in:\n{text}")


def check_templates() -> None:
    """Render every template with every combination of null fields."""
    rng = random.Random(0)  # separate stream: does not disturb the dataset
    full = Person("Ana", "Costa", True, "Brightwave", "Lisbon", "ana@brightwave.io")
    for template in TEMPLATES:
        for mask in range(8):
            nulls = {f: None for i, f in enumerate(OPTIONAL_FIELDS) if mask >> i & 1}
            p = replace(full, **nulls)
            check_text(render(template, fill_values(rng, p)), p)


def contact_text(rng: random.Random, p: Person) -> tuple[str, int]:
    index = rng.randrange(len(TEMPLATES))
    text = render(TEMPLATES[index], fill_values(rng, p))
    check_text(text, p)
    return text, index


def user_turn(rng: random.Random, text: str, first_turn: bool) -> str:
    r = rng.random()
    if r < 0.3:
        prefix = rng.choice(PREFIXES)
    elif not first_turn and r < 0.65:
        prefix = rng.choice(FOLLOWUPS)
    else:
        return text
    separators = SEPARATORS[:2] if "\n" in text else SEPARATORS
    return prefix + rng.choice(separators) + text


def make_correction(rng: random.Random, pool: Pool, p: Person) -> tuple[Person, str]:
    field = rng.choice(OPTIONAL_FIELDS)
    if field == "city":
        new = replace(p, city=rng.choice([c for c in CITIES if c != p.city]))
        kind = "city_change" if p.city else "city_add"
    elif field == "email":
        email = p.email
        while email == p.email:
            email = pick_email(rng, p.first, p.last, p.company)
        new = replace(p, email=email)
        kind = "email_change" if p.email else "email_add"
    else:
        company = rng.choice([c for c in pool.companies if c != p.company])
        new = replace(p, company=company)
        kind = "company_change" if p.company else "company_add"
        if p.company and p.email and p.email.endswith("@" + company_domain(p.company)):
            email = make_email(rng, p.first, p.last, company_domain(company))
            new, kind = replace(new, email=email), "company_change_email"
    values = fill_values(rng, new)
    note = rng.choice(CORRECTIONS[kind]).format(**values)
    for value in (new.city, new.company, new.email):
        if value and value not in (p.city, p.company, p.email) and value not in note:
            raise ValueError(f"correction misses {value!r}: {note}")
    return new, note


# --------------------------------------------------------------------------
# Conversations and splits
# --------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    system: bool
    messages: list[dict[str, str]]
    answers: list[Person]
    templates: list[int]


def build_row(rng: random.Random, pool: Pool, deck: NullDeck, shape: str, system: bool, max_turns: int) -> Row:
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = {"single": 1, "correction": 1}.get(shape) or rng.randint(2, max_turns)
    answers: list[Person] = []
    templates: list[int] = []
    for i in range(turns):
        person = make_person(rng, pool, deck)
        text, index = contact_text(rng, person)
        messages.append({"role": "user", "content": user_turn(rng, text, first_turn=i == 0)})
        messages.append({"role": "assistant", "content": person.answer()})
        answers.append(person)
        templates.append(index)
    if shape == "correction":
        person, note = make_correction(rng, pool, answers[-1])
        messages.append({"role": "user", "content": note})
        messages.append({"role": "assistant", "content": person.answer()})
        answers.append(person)
    return Row(shape, system, messages, answers, templates)


def build_split(
    rng: random.Random, pool: Pool, shapes: dict[tuple[str, bool], int], max_turns: int, seen: set[str]
) -> list[Row]:
    rows: list[Row] = []
    deck = NullDeck(rng)
    for (shape, system), count in shapes.items():
        while count:
            row = build_row(rng, pool, deck, shape, system, max_turns)
            key = json.dumps(row.messages, ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
            count -= 1
    rng.shuffle(rows)
    return rows


def check_held_out(train: list[Row], evals: list[Row]) -> None:
    def entities(rows: list[Row]) -> tuple[set[str], set[str], set[str]]:
        people = [p for r in rows for p in r.answers]
        return {p.first for p in people}, {p.last for p in people}, {p.company or "" for p in people}

    for seen_train, seen_eval in zip(entities(train), entities(evals), strict=True):
        leaked = (seen_train & seen_eval) - {""}
        if leaked:
            raise ValueError(f"eval leaks into train: {sorted(leaked)}")


def generate() -> dict[str, list[Row]]:
    check_templates()
    rng = random.Random(SEED)
    train_pool, eval_pool = split_pools(rng)
    seen: set[str] = set()
    train = build_split(rng, train_pool, TRAIN_SHAPES, max_turns=3, seen=seen)
    evals = build_split(rng, eval_pool, EVAL_SHAPES, max_turns=2, seen=seen)
    check_held_out(train, evals)
    return {"train.jsonl": train, "eval.jsonl": evals}


def serialize(rows: list[Row]) -> bytes:
    lines = [json.dumps({"messages": r.messages}, ensure_ascii=False) for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def summarize(name: str, rows: list[Row]) -> str:
    shapes = Counter(r.shape if r.shape != "multi" else f"multi-{len(r.templates)}" for r in rows)
    answers = [p for r in rows for p in r.answers[: len(r.templates)]]
    nulls = {f: sum(getattr(p, f) is None for p in answers) / len(answers) for f in OPTIONAL_FIELDS}
    words = [len(m["content"].split()) for r in rows for m in r.messages if m["role"] == "user"]
    chars = sum(len(json.dumps({"messages": r.messages}, ensure_ascii=False)) for r in rows)
    in_range = sum(15 <= w <= 45 for w in words) / len(words)
    return "\n".join(
        [
            f"{name}: {len(rows)} rows, shapes {dict(sorted(shapes.items()))}, "
            f"with system prompt {sum(r.system for r in rows)}",
            f"  extractions {len(answers)}, null rates " + ", ".join(f"{f} {v:.1%}" for f, v in nulls.items()),
            f"  templates used {len({t for r in rows for t in r.templates})}/{len(TEMPLATES)}, "
            f"user words median {median(words)}, 15-45 words {in_range:.0%}, "
            f"avg chars/row {chars / len(rows):.0f}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if files on disk are stale")
    args = parser.parse_args()
    splits = generate()
    if args.check:
        stale = [
            n
            for n, rows in splits.items()
            if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_bytes() != serialize(rows)
        ]
        for n in stale:
            print(f"stale: {OUT_DIR / n}", file=sys.stderr)
        if not stale:
            print(f"up to date: {OUT_DIR}")
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for n, rows in splits.items():
        (OUT_DIR / n).write_bytes(serialize(rows))
        print(summarize(n, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
