"""Stop strings in text that arrives a piece at a time: where the answer ends, and what to hold back meanwhile.

Each stop string is followed by a Knuth-Morris-Pratt automaton (Watch), so a character costs constant time per stop
string on average, whatever their lengths; comparing every start of a stop string with the text's end at every token
cost its length squared each time (a 250,000-character stop string took seconds a token, and the one worker thread
held every other request while it did).
"""

from __future__ import annotations

from collections.abc import Sequence


class Watch:
    """How far a growing text has got into one string, `target`: `state` is the length of the longest end of the
    text that is a start of the target (not all of it), kept by Knuth-Morris-Pratt: the target's length is paid
    once, for its table, and each character of text costs constant time on average."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.back = [0] * len(target)  # back[i]: the longest start of target that also ends target[: i + 1]
        k = 0
        for i in range(1, len(target)):
            while k and target[i] != target[k]:
                k = self.back[k - 1]
            k += target[i] == target[k]
            self.back[i] = k
        self.state = 0

    def step(self, char: str) -> bool:
        """Take the text's next character; True when the text now ends with the whole target."""
        state = self.state
        while state and self.target[state] != char:
            state = self.back[state - 1]
        state += self.target[state] == char
        whole = state == len(self.target)
        self.state = self.back[state - 1] if whole else state  # after a match, as far as it can still reach
        return whole


def partial_start(text: str, strings: Sequence[str]) -> int:
    """The length of the longest end of `text` that is a start (not the whole) of one of `strings`: text to hold
    back while it may still become one of them. Only the last len(s) - 1 characters can matter for s."""
    best = 0
    for s in strings:
        watch = Watch(s)
        for char in text[max(0, len(text) - len(s) + 1) :]:
            watch.step(char)
        best = max(best, watch.state)
    return best


class StopText:
    """Cuts the text where the first stop string is complete (at that string's start), holding back any tail that
    could still become one. Where it is cut does not depend on how the text arrives in pieces. Each character
    costs constant time per stop string, whatever their lengths, and what is held back is shorter than the
    longest of them."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.watches = [Watch(s) for s in stops if s]
        self.held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.watches:
            return text
        seen, text = len(self.held), self.held + text  # the held characters are already in the watches' states
        for i in range(seen, len(text)):
            done = [len(w.target) for w in self.watches if w.step(text[i])]  # every watch takes the character
            if done:
                self.hit, self.held = True, ""
                return text[: i + 1 - max(done)]  # it started inside the text held back or the new piece
        keep = max(w.state for w in self.watches)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text
