#!/usr/bin/env python3
"""Generate philora's sample tool-calling dataset (messages format with `tools`, OpenAI shapes).

Five small functions; each row offers two to four of them, in random order, always including those it needs.
Rows are of four kinds:
- single: one call, its result, and a final answer that uses the result;
- parallel: two calls in one assistant turn (two cities, two conversions...), both results, one final answer;
- call only: the conversation ends at the assistant's call (what a server returns as `tool_calls`);
- no call: a greeting, thanks or a question about the assistant itself, answered in words although tools are
  offered.
Arguments are copied from the user's words, so a model can learn them. The eval split uses cities, currency
amounts, tickers and bills that never occur in train, and ends every row at the turn being measured: a call
(single or parallel), a final answer after results, or an answer needing no call.

Usage:
    python scripts/make_tool_data.py           # (re)write philora/sample/tools-{train,eval}.jsonl
    python scripts/make_tool_data.py --check   # exit 1 if the files are stale

Stdlib only and deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 4242
OUT_DIR = Path(__file__).resolve().parent.parent / "philora" / "sample"
TRAIN_ROWS, EVAL_ROWS = 400, 80

TOOLS = {
    "get_weather": {
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
    "convert_currency": {
        "description": "Convert an amount of money.",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
            "required": ["amount", "source", "target"],
        },
    },
    "get_local_time": {
        "description": "Local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "stock_price": {
        "description": "Latest price of a stock by ticker.",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]},
    },
    "calculate_tip": {
        "description": "Tip for a restaurant bill.",
        "parameters": {
            "type": "object",
            "properties": {"bill": {"type": "number"}, "percent": {"type": "number"}},
            "required": ["bill", "percent"],
        },
    },
}

CITIES = [
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Lagos", "Hanoi", "Porto", "Quito", "Perth", "Dublin",
    "Madrid", "Seoul", "Austin", "Zurich", "Nairobi", "Bogota", "Krakow", "Osaka", "Tunis", "Riga", "Boston",
    "Lyon", "Accra", "Manila", "Santiago", "Vienna", "Dakar", "Hobart", "Bergen", "Sofia", "Male", "Recife",
]  # fmt: skip
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "AUD", "INR", "BRL", "MXN"]
TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "TSLA", "IBM", "ORCL", "INTC", "SAP", "SONY", "META", "ADBE", "CSCO", "QCOM"]
NO_CALL = [
    ("Hi there!", "Hello! I can look up weather, local times, stock prices, convert currencies and work out tips."),
    ("Thanks a lot!", "You're welcome!"),
    ("What can you do?", "I can look up weather, local times, stock prices, convert currencies and work out tips."),
    ("Who are you?", "I am an assistant that answers with the help of a few tools."),
    ("Good morning", "Good morning! How can I help?"),
    ("That's all, bye.", "Goodbye!"),
    ("Can you help me?", "Yes. Ask me about weather, local times, stock prices, currencies or tips."),
    ("Thank you, that helps.", "Glad it helped!"),
]


def split_pool(items: list, rng: random.Random, held: float = 0.25) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    cut = max(2, round(len(items) * held))
    return items[cut:], items[:cut]


class Maker:
    """Rows from one pool of values (train's or eval's)."""

    def __init__(self, rng: random.Random, cities: list[str], tickers: list[str], amounts: list[int]) -> None:
        self.rng, self.cities, self.tickers, self.amounts = rng, cities, tickers, amounts

    def request(self) -> tuple[str, str, dict, dict]:
        """(question phrase, name, arguments, result) of one call."""
        rng = self.rng
        name = rng.choice(list(TOOLS))
        if name == "get_weather":
            city = rng.choice(self.cities)
            unit = rng.choice(["celsius", "fahrenheit", None])
            args = {"city": city} | ({"unit": unit} if unit else {})
            degrees = rng.randint(-5, 35) if unit != "fahrenheit" else rng.randint(25, 95)
            sky = rng.choice(["sunny", "cloudy", "rainy", "windy"])
            asked = f"the weather in {city}" + (f" in {unit}" if unit else "")
            return asked, name, args, {"temperature": degrees, "sky": sky}
        if name == "convert_currency":
            source, target = rng.sample(CURRENCIES, 2)
            amount = rng.choice(self.amounts)
            value = round(amount * rng.uniform(0.5, 1.6), 2)
            return (
                f"{amount} {source} in {target}",
                name,
                {"amount": amount, "source": source, "target": target},
                {"converted": value},
            )
        if name == "get_local_time":
            city = rng.choice(self.cities)
            return (
                f"the time in {city}",
                name,
                {"city": city},
                {"time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"},
            )
        if name == "stock_price":
            ticker = rng.choice(self.tickers)
            return f"the price of {ticker}", name, {"ticker": ticker}, {"price": round(rng.uniform(20, 900), 2)}
        bill, percent = rng.choice(self.amounts), rng.choice([10, 15, 18, 20])
        return (
            f"a {percent}% tip on {bill}",
            name,
            {"bill": bill, "percent": percent},
            {"tip": round(bill * percent / 100, 2)},
        )

    def offered(self, needed: list[str]) -> list[dict]:
        others = [n for n in TOOLS if n not in needed]
        names = needed + self.rng.sample(others, self.rng.randint(max(0, 2 - len(needed)), 4 - len(needed)))
        self.rng.shuffle(names)
        return [{"type": "function", "function": {"name": n, **TOOLS[n]}} for n in names]

    def question(self, asked: list[str]) -> str:
        opener = self.rng.choice(["What is", "Tell me", "Can you get", "I need", "Look up"])
        return f"{opener} {' and '.join(asked)}?"

    def row(self, kind: str) -> dict:
        if kind == "none":
            question, reply = self.rng.choice(NO_CALL)
            return {"tools": self.offered([]), "messages": [user(question), assistant(reply)]}
        wanted = [self.request() for _ in range(2 if kind == "parallel" else 1)]
        if kind == "parallel":  # two calls to one function, the common parallel case
            while wanted[1][1] != wanted[0][1] or wanted[1][2] == wanted[0][2]:
                wanted[1] = self.request()
        names = list(dict.fromkeys(w[1] for w in wanted))
        calls = [{"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                 for k, (_, n, a, _) in enumerate(wanted)]  # fmt: skip
        messages = [
            user(self.question([w[0] for w in wanted])),
            {"role": "assistant", "content": None, "tool_calls": calls},
        ]
        if kind == "call-only":
            return {"tools": self.offered(names), "messages": messages}
        for k, (_, _, _, result) in enumerate(wanted):
            messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": json.dumps(result)})
        messages.append(assistant(" ".join(final(w) for w in wanted)))
        return {"tools": self.offered(names), "messages": messages}


def final(wanted: tuple[str, str, dict, dict]) -> str:
    _, name, args, result = wanted
    if name == "get_weather":
        unit = {"fahrenheit": "°F"}.get(args.get("unit", ""), "°C")
        return f"In {args['city']} it is {result['temperature']}{unit} and {result['sky']}."
    if name == "convert_currency":
        return f"{args['amount']} {args['source']} is {result['converted']} {args['target']}."
    if name == "get_local_time":
        return f"It is {result['time']} in {args['city']}."
    if name == "stock_price":
        return f"{args['ticker']} trades at {result['price']}."
    return f"A {args['percent']}% tip on {args['bill']} is {result['tip']}."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def eval_row(maker: Maker, kind: str) -> dict:
    """An eval row ends at the answer measured: calls, a final answer after results, or an answer without calls."""
    if kind in ("single", "parallel"):
        row = maker.row("call-only" if kind == "single" else "parallel")
        row["messages"] = row["messages"][:2]
        return row
    return maker.row("single" if kind == "final" else "none")


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train_cities, eval_cities = split_pool(CITIES, rng)
    train_tickers, eval_tickers = split_pool(TICKERS, rng)
    train_amounts, eval_amounts = split_pool(list(range(5, 400, 5)), rng)
    train, held = (
        Maker(rng, train_cities, train_tickers, train_amounts),
        Maker(rng, eval_cities, eval_tickers, eval_amounts),
    )
    kinds = ["single"] * 4 + ["parallel"] * 2 + ["call-only"] * 2 + ["none"] * 2
    rows = {"train": [train.row(rng.choice(kinds)) for _ in range(TRAIN_ROWS)]}
    eval_kinds = ["single", "single", "parallel", "final", "none"]
    rows["eval"] = [eval_row(held, eval_kinds[i % len(eval_kinds)]) for i in range(EVAL_ROWS)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files differ from what would be written")
    args = parser.parse_args()
    stale = []
    for split, rows in build().items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path = OUT_DIR / f"tools-{split}.jsonl"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path} ({len(rows)} rows)")
    if stale:
        print(f"stale: {', '.join(stale)}; run scripts/make_tool_data.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
