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
