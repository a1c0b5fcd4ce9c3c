"""data.max_length: null (auto): the row length chosen from the training data's own token lengths.

The p99 of the samples' lengths, rounded up to a multiple of 64, at most the model's context and AUTO_CAP. The p99
rather than the longest: packed rows are as long as max_length, so the one outlier would set the memory and time of
every step; the few samples past it are cut or split by data.overlong and counted in the report, never dropped
silently. AUTO_CAP keeps a 128k-context model from getting 128k-token rows for data that needs a fraction of that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from philora.data.render import IGNORE

AUTO_CAP = 4096  # tokens: the longest row auto picks, whatever the model's context
ROUND_TO = 64  # a multiple of this: kernels and memory like it, and the number reads as a setting
QUANTILE = 0.99
CONTEXT_UNKNOWN = 10**9  # tokenizers without a limit say so with a huge model_max_length


@dataclass(frozen=True)
class LengthChoice:
    """What auto chose for max_length and from what."""

    length: int
    p99: int  # the training samples' p99 length in tokens, measured with rows of `cap`
    cap: int  # the model's context or AUTO_CAP, the smaller
    samples: int  # how many samples were measured
    cut: int = 0  # conversations longer than `length`, cut, split or dropped by data.overlong

    def describe(self, overlong: str) -> str:
        """The report's line: 'max_length 320 (auto: p99 of the training data, 301 tokens over 1,200 samples, ...);
        12 longer conversations handled per data.overlong: truncate; ...'."""
        capped = f", capped at {self.cap}" if math.ceil(self.p99 / ROUND_TO) * ROUND_TO > self.cap else ""
        longer = (
            f"{self.cut:,} longer conversations handled per data.overlong: {overlong}" if self.cut else "all fit whole"
        )
        return (
            f"max_length {self.length} (auto: p99 of the training data, {self.p99} tokens over {self.samples:,} "
            f"samples, rounded up to a multiple of {ROUND_TO}{capped}); {longer}; set data.max_length to choose"
        )


def cap(context: int | None) -> int:
    """The longest row auto may choose: the model's context (when known) or AUTO_CAP, the smaller."""
    if context is None or context <= 0 or context >= CONTEXT_UNKNOWN:
        return AUTO_CAP
    return min(context, AUTO_CAP)


def choose(lengths: Sequence[int], limit: int) -> LengthChoice:
    """The auto max_length for samples of these token lengths (measured with rows of at most `limit` tokens)."""
    ordered = sorted(lengths)
    p99 = ordered[max(0, math.ceil(QUANTILE * len(ordered)) - 1)] if ordered else 0
    rounded = max(ROUND_TO, math.ceil(p99 / ROUND_TO) * ROUND_TO)
    return LengthChoice(min(rounded, limit), p99, limit, len(ordered))


ANSWER_MARGIN = 16  # tokens past the longest reference: room for an answer that is nearly right, to be scored so
ANSWER_CAP = 1024  # the most auto gives; an answer past it is not what a held-out reference asks for


def last_answer(sample: Any) -> int:
    """The tokens of a sample's last trained stretch: its last answer with its end-of-turn."""
    trained = np.flatnonzero(sample.labels != IGNORE)
    if not trained.size:
        return 0
    gaps = np.flatnonzero(np.diff(trained) > 1)
    return int(trained.size - (gaps[-1] + 1 if gaps.size else 0))


def answer_budget(samples: Sequence[Any]) -> tuple[int, int]:
    """(new tokens per generated eval answer, the longest reference answer in tokens) for training_config.
    generation_max_length: null: the longest reference plus ANSWER_MARGIN, rounded up to a multiple of 16. A budget
    of 128 for answers of 12 tokens had the starting model ramble to the limit on every prompt: minutes of a run."""
    longest = max((last_answer(s) for s in samples), default=0)
    return min(ANSWER_CAP, 16 * math.ceil((longest + ANSWER_MARGIN) / 16)), longest
