"""Incremental detokenisation and stop strings.

Text grows only by whole characters: a token that ends inside a multi-byte UTF-8 character
decodes to U+FFFD and is held back until the tokens that complete it arrive (the prefix/read
offset scheme of vLLM and TGI). A UTF-8 character has at most 4 bytes and every token at least
one, so after 4 pending tokens a U+FFFD is a real invalid sequence and is let through; when the
request finishes the rest is flushed. The final text therefore equals decoding the output
tokens in one go. A few prompt tokens seed the context so that tokenizers which
mark word starts (SentencePiece's ▁) decode the first output token with its space.

Stop strings are searched in the new text plus the max(len(stop)) - 1 characters before it, so
a stop string split across tokens is found; the text from the stop string on is cut (unless
include_stop_str_in_output). While a request runs, `take_delta` holds back the last
max(len(stop)) - 1 characters, which might be the start of a stop string.
"""

from __future__ import annotations

from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.hold_back = max((len(s) for s in params.stop), default=1) - 1
        self.stopped = False

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string it completed, if any (text already cut)."""
        self.ids.append(token_id)
        before = len(self.text)
        if not self._advance(final=False):
            return None
        return self._find_stop(before)

    def flush(self) -> None:
        """At the end: whatever is still held back, incomplete characters included."""
        if not self.stopped:
            self._advance(final=True)

    def _advance(self, final: bool) -> bool:
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        pending = len(self.ids) - self.read_offset
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and pending < 4 and not final):
            return False  # nothing new yet, or a character that may still complete
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return True

    def _find_stop(self, new_from: int) -> str | None:
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = self.text[:end]
                self.stopped = True
                return stop
        return None

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, the possible start of a stop string stays back."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold_back)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta
