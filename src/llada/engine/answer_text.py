"""From answer canvases to text that can be shown: only what later steps cannot change.

Used by the API server's answers and streams and by ``llada chat``'s live output; it knows the
tokenizer, not the model or the server. A diffusion answer is decided out of order, so streamed text is the decoded *decided prefix*: the
answer up to its first still-masked position. Of that text, two tails are held back until more is
decided: an incomplete UTF-8 character (the tokenizer decodes a partial byte sequence to U+FFFD) and
a tail that could be the start of a stop sequence (the stop string would remove it). The answer is
complete at its first end-of-text token, at a stop sequence, or once its first ``max_tokens``
positions are decided; the rest of the canvas is then irrelevant.

Cost per update: one decode of the decided prefix, and for each stop string of length S at most S - 1
comparisons of at most S - 1 characters (callers bound S: the server to ``MAX_STOP_CHARS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from llada.model.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


def answer_text(tokenizer: Tokenizer, answer_ids: Sequence[int]) -> str:
    """A finished answer's text: decoded up to (not including) the first EOS or end-of-turn token."""
    stops = {tokenizer.ids.eos, tokenizer.ids.eot}
    kept = []
    for token in answer_ids:
        if token in stops:
            break
        kept.append(token)
    return tokenizer.decode([t for t in kept if t != tokenizer.ids.mask], skip_special_tokens=True)


class AnswerText:
    """The text of one answer as its canvas fills in; ``update`` returns what may be sent now."""

    def __init__(self, tokenizer: Tokenizer, mask_id: int, end_ids: Sequence[int], max_tokens: int,
                 stop: Sequence[str] = ()) -> None:
        """
        Args:
            mask_id, end_ids: the model's mask and end-of-text (EOS, EoT) ids.
            max_tokens: answer tokens kept at most.
            stop: strings that end the answer (they and what follows are dropped).
        """
        self.tokenizer, self.mask_id, self.end_ids = tokenizer, mask_id, frozenset(end_ids)
        self.max_tokens, self.stop = max_tokens, list(stop)
        self.sent = ""  # text already handed out
        self.finish_reason: FinishReason | None = None  # set once the answer is complete
        self.completion_tokens = 0  # answer tokens behind the final text (set when complete)

    @property
    def complete(self) -> bool:
        return self.finish_reason is not None

    def update(self, answer: Sequence[int], finished: bool = False) -> str:
        """Take the canvas after a step (undecided positions hold the mask id); return the new text.

        ``finished``: the engine has finished this answer (every position is decided).
        """
        if self.complete:
            return ""
        window = list(answer[:self.max_tokens])
        prefix = window[:window.index(self.mask_id)] if self.mask_id in window else window
        end = next((i for i, token in enumerate(prefix) if token in self.end_ids), None)
        tokens = prefix if end is None else prefix[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None or end is not None:
            self.finish_reason = "stop"
        elif finished or len(prefix) == len(window):
            self.finish_reason = "length"
        if self.complete:
            final = text if cut is None else text[:cut]
            self.completion_tokens = len(tokens) if cut is None else self._tokens_behind(tokens, len(final))
            return self._advance(final)
        return self._advance(self._settled(text))

    def _settled(self, text: str) -> str:
        """``text`` without the tails that more decided tokens could still change."""
        text = text.rstrip("\ufffd")
        held = max((stop_prefix_at_end(text, stop) for stop in self.stop), default=0)
        return text[:len(text) - held]

    def _advance(self, text: str) -> str:
        # Decoding is prefix-stable for byte-level tokenizers; should a tokenizer rewrite earlier text,
        # nothing more is sent rather than text that contradicts what was sent.
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _tokens_behind(self, tokens: list[int], length: int) -> int:
        """Fewest leading tokens whose text covers ``length`` characters (a stop sequence cut the text)."""
        low, high = 0, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if len(self.tokenizer.decode(tokens[:middle], skip_special_tokens=True)) >= length:
                high = middle
            else:
                low = middle + 1
        return low


def stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with (0 if none).

    That tail could still grow into ``stop``, so it is held back. Only the last ``len(stop) - 1``
    characters can take part: at most that many candidates, longest first.
    """
    tail = text[len(text) - min(len(stop) - 1, len(text)):]
    for start in range(len(tail)):
        if stop.startswith(tail[start:]):
            return len(tail) - start
    return 0
