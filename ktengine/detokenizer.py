"""Incremental detokenization: token ids in, text deltas out, UTF-8-safe, with stop strings.

Each new token is decoded together with a short window of the tokens before it (prefix_offset
.. read_offset), so tokenizers whose text depends on the neighbour (SentencePiece's leading
"▁", byte-level BPE splitting one character over several tokens) give the same text as decoding
everything at once, at O(1) cost per token. While the window's text ends in U+FFFD (a character
whose bytes have not all arrived), nothing is emitted.

Stop strings are matched on the decoded text. Text that could still be the start of a stop
string is held back until it cannot be, so a stop string split across tokens is caught and the
emitted text never contains any part of it (unless include_stop_str_in_output).
"""
from __future__ import annotations

from collections.abc import Sequence

from ktengine.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded with the first output token, so its leading space comes out right.
_PROMPT_CONTEXT = 5
# A UTF-8 character has at most 4 bytes: once this many tokens are unread and the text still
# ends in U+FFFD, the bytes are invalid for good and are emitted as U+FFFD.
_MAX_HELD_TOKENS = 4


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, one token at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0  # window start: context decoded for spacing, never emitted
        self._read_offset = len(self._ids)  # tokens before this have had their text produced
        self._pending = ""  # produced text held back because a stop string may start in it
        self.stopped: bool = False
        self.stop_reason: str | None = None
        self.text: str = ""

    def add(self, token_id: int) -> str:
        """Take the next output token; return the text that is now safe to emit (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        unread = len(self._ids) - self._read_offset
        if len(new_text) <= len(prefix_text) or (
                new_text.endswith(_REPLACEMENT) and unread < _MAX_HELD_TOKENS):
            # No new text yet (e.g. a skipped special token: the window keeps its context for
            # the next token's spacing), or a character still incomplete.
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        # Keep the list short: only the window is ever decoded again.
        del self._ids[:self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return self._emit(new_text[len(prefix_text):], final=False)

    def flush(self) -> str:
        """End of generation: return whatever is still held back (nothing after a stop)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(new_text[len(prefix_text):], final=True)

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _emit(self, delta: str, final: bool) -> str:
        text = self._pending + delta
        match = self._find_stop(text)
        if match is not None:
            position, stop = match
            out = text[:position + (len(stop) if self._include_stop else 0)]
            self.stopped, self.stop_reason, self._pending = True, stop, ""
        else:
            keep = 0 if final else self._partial_stop_len(text)
            out, self._pending = text[:len(text) - keep], text[len(text) - keep:]
        self.text += out
        return out

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        # The earliest match wins; the pending text never holds a whole stop string, so any match
        # ends in the new delta.
        best: tuple[int, str] | None = None
        for stop in self._stop:
            position = text.find(stop)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _partial_stop_len(self, text: str) -> int:
        # Length of the longest suffix of text that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
