"""Incremental detokenization of one request's output, with stop strings.

Text is decoded token by token with `tokenizers.decoders.DecodeStream` (which waits for whole
UTF-8 characters), so the deltas add up to `tokenizer.decode(ids, skip_special_tokens=...)`.
With stop strings, the text is held back while its end could still be the start of one:

    | shown to the user | held back (a prefix of some stop string) |

so text from a stop string on is never shown, even when the stop string spans tokens.
"""

from dataclasses import dataclass

import tokenizers
from tokenizers.decoders import DecodeStream


@dataclass(frozen=True)
class DetokenizedDelta:
    """New text to show; `stopped` when a stop string ended the output (it is not in `text`)."""

    text: str
    stopped: bool = False


class Detokenizer:
    """One request's output text, fed one batch of new token ids at a time. With
    `include_stop_str`, the stop string that ends the text is part of it."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, stop: list[str], skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:  # fmt: skip
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._include_stop_str = include_stop_str
        self._held = ""

    def push(self, token_ids: list[int], check_stops: bool = True) -> DetokenizedDelta:
        """Decode `token_ids`; the text they make visible, cut before (or after) a stop string if
        one appears. Without `check_stops` (before min_tokens) stop strings are text like any."""
        for token_id in token_ids:
            self._held += self._stream.step(self._tokenizer, token_id) or ""
        found = self._find_stop() if check_stops else None
        if found is not None:
            cut, stop = found
            end = cut + len(stop) if self._include_stop_str else cut
            text, self._held = self._held[:end], ""
            return DetokenizedDelta(text, stopped=True)
        if not check_stops:
            text, self._held = self._held, ""
            return DetokenizedDelta(text)
        keep = self._stop_prefix_length()
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(text) :]
        return DetokenizedDelta(text)

    def flush(self) -> str:
        """The held-back text, shown when the request ends for a reason other than a stop string."""
        text, self._held = self._held, ""
        return text

    def _find_stop(self) -> tuple[int, str] | None:
        """Where in the held text the earliest stop string starts, and which it is; or None."""
        found = [(i, s) for s, i in ((s, self._held.find(s)) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that some stop string starts with."""
        held = self._held
        for length in range(min(len(held), max((len(s) for s in self._stop), default=0)), 0, -1):
            tail = held[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
