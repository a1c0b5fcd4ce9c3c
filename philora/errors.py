"""The errors philora shows to users.

A `UserError` is a mistake in what the user gave us (config, flags, data, paths). The CLI prints each of its
problems as one line and exits with code 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """One or more problems with the user's input; each problem is one line naming the place, value and fix."""

    def __init__(self, *problems: str) -> None:
        if not problems:
            raise ValueError("UserError needs at least one problem")
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


MAX_LISTED = 10  # problems shown one per line before the rest are only counted


def first_problems(problems: list[str], noun: str = "bad row") -> tuple[list[str], str]:
    """The first MAX_LISTED problems, and how many there are in all for the line that follows them:
    ('12 bad rows in all (2 more not listed)')."""
    listed = problems[:MAX_LISTED]
    more = len(problems) - len(listed)
    count = f"{len(problems)} {noun}{'s' if len(problems) != 1 else ''} in all"
    return listed, count + (f" ({more} more not listed)" if more else "")
