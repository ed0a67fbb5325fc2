"""Stop strings on the streamed text, as OpenAI's and TGI's `stop` mean them: the text ends before the first
stop string, which is not part of the output, wherever the tokenizer split it.

While streaming, text that could be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""   # text received and not yet released
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """The part of the text so far that can be released now. After a stop string, nothing more."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        if final:
            out, self.pending = self.pending, ""
            return out
        keep = self._held_back()
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def _held_back(self) -> int:
        """The longest tail of the pending text that is the start of some stop string."""
        for size in range(min(self.longest - 1, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
