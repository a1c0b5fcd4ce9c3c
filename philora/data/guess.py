"""The `data.columns` mapping for a table whose column names are not philora's, from the names people commonly use
(question/answer, input/output, query/response, ...): what `philora init` writes into a starter config."""

from __future__ import annotations

# Our field → the column names that mean it, most telling first. Only two-role data (one question, one answer) is
# guessed: a conversation column under another name is rare and its inner keys would need mapping too.
PROMPT_NAMES = ("prompt", "question", "query", "instruction", "input", "source", "user", "request", "q")
COMPLETION_NAMES = ("completion", "answer", "response", "output", "target", "reply", "assistant", "a", "label")


def guess_columns(columns: list[str]) -> dict[str, str] | None:
    """{prompt: COLUMN, completion: COLUMN} for a table with recognisable question and answer
    columns (case-insensitive); None when either is missing or the choice is ambiguous."""
    by_lower: dict[str, str] = {}
    for name in columns:
        by_lower.setdefault(name.strip().lower(), name)
    prompt = _first(PROMPT_NAMES, by_lower)
    completion = _first(COMPLETION_NAMES, by_lower, exclude=prompt)
    if prompt is None or completion is None:
        return None
    mapping = {"prompt": prompt, "completion": completion}
    # philora's own names need no mapping
    return {field: column for field, column in mapping.items() if field != column}


def _first(names: tuple[str, ...], by_lower: dict[str, str], exclude: str | None = None) -> str | None:
    return next((by_lower[n] for n in names if n in by_lower and by_lower[n] != exclude), None)
