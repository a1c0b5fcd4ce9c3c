"""What `philora check` found: lines per section for people, facts per section for scripts (--json), and the
errors (exit 2, each naming its fix) and warnings (reported, never failing), which also go to standard error."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    lines: dict[str, list[str]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, section: str, *lines: str) -> None:
        self.lines.setdefault(section, []).extend(lines)

    def text(self) -> str:
        width = max(map(len, self.lines), default=0) + 2
        out = []
        for section, lines in self.lines.items():
            for i, line in enumerate(lines):
                out.append(f"{section if i == 0 else '':<{width}}{line}")
        # "all clear" only with nothing to read either: a warning names a run that works but will not learn well
        verdict = (f"{len(self.errors)} problem(s) to fix" if self.errors
                   else "nothing to fix" if self.warnings else "all clear")  # fmt: skip
        out.append(
            f"check: {verdict}, {len(self.warnings)} warning(s){' (below)' if self.errors or self.warnings else ''}"
        )
        return "\n".join(out)

    def problems(self) -> list[str]:
        """The lines for standard error, as every philora command reports problems."""
        return [f"philora: error: {e}" for e in self.errors] + [f"philora: warning: {w}" for w in self.warnings]

    def json(self) -> str:
        record = {"ok": not self.errors, "errors": self.errors, "warnings": self.warnings, **self.facts}
        return json.dumps(record, indent=2, ensure_ascii=False, default=str)


def size(n: float | None) -> str:
    """Bytes for people: 1.23 GiB, 456 MiB."""
    if n is None:
        return "unknown"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"
