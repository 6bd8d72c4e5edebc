"""The runaway guard: notice an answer that keeps repeating itself, so it can be stopped.

Small models sometimes fall into a sampling loop ("Eso es la raza de los perros." again and
again) and would run to ``max_tokens``: seconds or minutes of a busy model for nothing.
The guard reads the answer's text as it streams, backend-agnostic, and trips when

* the end of the answer is one passage of ``min_chars``..``max_chars`` characters repeated
  ``repeats`` times in a row (whitespace collapsed), or
* one sentence or line of at least ``min_chars`` characters has come ``repeats`` times in
  the answer, list markers and numbering aside ("1. Eso es..." / "2. Eso es...", or a
  paragraph that comes back with a word changed but the same sentences), or one list item
  of any length twice as often ("9. Erocer" ... "16. Erocer").

Shorter patterns are caught too once they repeat past ``min_chars`` (a period of 2
repeated 40 times is also a period of 16 repeated 5 times). A passage must be mostly words
(at least half of ``min_chars`` in letters): table rules, separators and runs of numbers
repeat legitimately. Engine.stream asks the backend to stop through
``GenerationParams.stop_check`` once it trips.
"""

from __future__ import annotations

import re

__all__ = ["RunawayGuard"]

_SPACE = re.compile(r"\s+")
#: Where a sentence (a word, then . ! ? or …; not "1." of a list) or a line ends.
_SEGMENT_END = re.compile(r"(?<=[^\W\d_][.!?…])\s+|\n")
#: What is stripped from a line before comparing: list bullets and numbering.
_LIST_MARKER = re.compile(r"^\s*(?:[-*•>]+|\(?\d+[.)]|[a-zA-Z][.)])\s+")


class RunawayGuard:
    """Feed it the answer piece by piece; ``feed`` returns True once the answer loops."""

    def __init__(self, *, min_chars: int = 16, max_chars: int = 400, repeats: int = 4):
        if min_chars < 1 or max_chars < min_chars or repeats < 2:
            raise ValueError("need 1 <= min_chars <= max_chars and repeats >= 2")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.repeats = repeats
        # The tail kept (whitespace collapsed): enough for max_chars x repeats.
        self._keep = max_chars * repeats + min_chars
        self._tail = ""
        self._line = ""
        self._lines: dict[str, int] = {}
        self.tripped = False
        #: what repeated, for the log and the trace
        self.reason = ""
        self._min_letters = max(1, min_chars // 2)

    def _wordy(self, text: str) -> bool:
        return sum(ch.isalpha() for ch in text) >= self._min_letters

    def feed(self, text: str) -> bool:
        if self.tripped or not text:
            return self.tripped
        piece = _SPACE.sub(" ", text)
        if piece.startswith(" ") and self._tail.endswith(" "):
            piece = piece[1:]
        self._tail += piece
        if len(self._tail) > 2 * self._keep:  # cut now and then, not on every piece
            self._tail = self._tail[-self._keep:]
        if self._repeated_segment(text) or self._periodic_tail():
            self.tripped = True
        return self.tripped

    def _repeated_segment(self, text: str) -> bool:
        if not _SEGMENT_END.search(self._line[-2:] + text):  # nothing ended: the common case
            self._line += text
            if len(self._line) > 2 * self._keep:  # one endless sentence: keep its tail
                self._line = self._line[-self._keep:]
            return False
        *done, self._line = _SEGMENT_END.split(self._line + text)
        for line in done:
            unmarked = _LIST_MARKER.sub("", line)
            key = _SPACE.sub(" ", unmarked).strip()
            if len(key) >= self.min_chars and self._wordy(key):
                needed = self.repeats
            elif unmarked != line and sum(ch.isalpha() for ch in key) >= 4:
                needed = 2 * self.repeats  # a short list item: "Erocer" again and again
            else:
                continue
            count = self._lines.get(key, 0) + 1
            self._lines[key] = count
            if count >= needed:
                self.reason = f"{key[:60]!r} came {count} times"
                return True
        return False

    def _periodic_tail(self) -> bool:
        text = self._tail
        size = len(text)
        probe = text[-self.min_chars:]
        if size < self.min_chars * self.repeats:
            return False
        # A tail of period p has its last min_chars characters again p characters earlier:
        # the earlier occurrences of the probe are the only periods worth checking.
        end = size - 1
        # Periods longer than max_chars are not looked for: neither are their occurrences.
        start = max(0, size - self.max_chars - self.min_chars)
        while True:
            found = text.rfind(probe, start, end)
            if found < 0:
                return False
            period = size - (found + self.min_chars)
            if period > self.max_chars or period * self.repeats > size:
                return False
            unit = text[-period:]
            if (period >= self.min_chars and text.endswith(unit * self.repeats)
                    and self._wordy(unit)):
                self.reason = (f"the passage {unit.strip()[:60]!r} came {self.repeats} "
                               "times in a row")
                return True
            end = found + self.min_chars - 1
