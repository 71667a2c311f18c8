"""Token choice and text assembly: sampling, stop strings, UTF-8-safe streaming detokenisation."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from edgevl.types import SamplingParams


class Sampler:
    """Greedy when temperature is 0; otherwise temperature, top-k, top-p, in that order.
    Penalties come first: repetition (prompt and answer), then OpenAI's presence and frequency
    penalties (the answer only: the sampler remembers what it chose)."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.chosen: list[int] = []

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        tok = self._choose(logits, history)
        self.chosen.append(tok)
        return tok

    def _choose(self, logits: np.ndarray, history: list[int]) -> int:
        x = logits.astype(np.float32, copy=True)
        if self.p.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = x[seen]
            with np.errstate(over="ignore", divide="ignore"):  # absurd penalties give inf, handled below
                x[seen] = np.where(vals > 0, vals / self.p.repetition_penalty, vals * self.p.repetition_penalty)
        if (self.p.presence_penalty or self.p.frequency_penalty) and self.chosen:
            ids, counts = np.unique(np.asarray(self.chosen, dtype=np.int64), return_counts=True)
            x[ids] -= self.p.presence_penalty + self.p.frequency_penalty * counts
        if self.p.temperature < 1e-4:  # below this, sampling is greedy in all but floating-point noise
            return int(np.argmax(x))
        x /= self.p.temperature
        # extreme penalties or temperatures overflow: keep the order, drop NaN (masked tokens stay -inf)
        x = np.nan_to_num(x, nan=-np.inf, posinf=np.finfo(np.float32).max / 2, neginf=-np.inf)
        k = self.p.top_k if 0 < self.p.top_k < x.size else min(x.size, 1024)
        # only the top candidates can survive top-p in practice; sorting 150k logits each step is waste
        top = np.argpartition(-x, k - 1)[:k]
        top = top[np.argsort(-x[top], kind="stable")]
        probs = np.exp(x[top] - x[top[0]])
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.p.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            top = top[:keep]
        return int(top[self.rng.choice(len(top), p=probs)])


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the k likeliest (token, log p), from the logits as the model gave them
    (after the grammar's mask, before penalties and temperature: OpenAI's `logprobs`)."""
    top = float(np.max(logits))
    lse = top + float(np.log(np.sum(np.exp(logits - top), dtype=np.float64)))
    best: list[tuple[int, float]] = []
    if k > 0:
        idx = np.argpartition(logits, logits.size - min(k, logits.size))[-k:]
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        best = [(int(i), float(logits[i]) - lse) for i in idx if np.isfinite(logits[i])]
    return float(logits[token]) - lse, best


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted past 255
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTES = _byte_decoder()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (a byte-level piece may be part of a UTF-8 character)."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    if token_id in tokenizer.get_added_tokens_decoder() or any(ch not in _BYTES for ch in piece):
        return piece.encode()
    return bytes(_BYTES[ch] for ch in piece)


class StreamDecoder:
    """Emits text as tokens arrive, holding back bytes of an unfinished UTF-8 character.

    Decoding every token alone breaks multi-byte characters split over byte-level tokens
    (common for CJK); decoding the whole sequence each step is quadratic. So we decode a short
    window that ends at the new token and emit only what is newly complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_ids: set[int]):
        self.tok = tokenizer
        self.skip = skip_ids
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window used as left context
        self.read_offset = 0  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.skip], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (a truly broken byte sequence becomes U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopMatcher:
    """Finds stop strings across piece boundaries; holds back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None  # the stop string found, once one is

    def feed(self, piece: str) -> tuple[str, bool]:
        """→ (text safe to emit now, stopped)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda h: h[0])
            self.held = ""
            return text[:cut], True
        keep = 0
        for s in self.stops:  # longest suffix of text that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-n:]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
