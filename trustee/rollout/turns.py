"""Environment turns and opening prompts to ids without running the chat template every turn.

Owns `TurnRenderer`: one per tool set (the episode runner builds it beside the tool-call
parser and shares it across episodes). It produces exactly the ids `ChatFormat.prompt_ids` /
`ChatFormat.continuation_ids` produce, faster:

- The chat template runs once per message *shape* (the roles and tool names of the messages,
  generation prompt on or off), with each message's content replaced by a sentinel; later
  turns of that shape substitute their contents into the rendered text. Valid for templates
  that insert a system/user/tool message's content verbatim, once; checked when a shape is
  built (every sentinel appears exactly once, and a second set of sentinels renders to the
  same text under substitution) and on the first `verify_uses` real turns of each shape (the
  substituted text must equal the template's own rendering). A shape that fails a check
  falls back to the template for good (logged once). Assistant messages, and messages
  carrying tool calls or reasoning, always take the template path.
- Text is encoded and decoded with the fast tokenizer's Rust backend directly (skipping the
  transformers wrapper's per-call overhead, and character offsets where the backend has
  `encode_batch_fast`), after checking on the first encodes that the
  ids equal `tokenizer.encode(text, add_special_tokens=False)`; the decode shortcut is used
  only where `tokenizer.decode` would not post-process the text. Where exact, a text is
  encoded piece by piece between its added tokens, and the pieces that repeat (template
  scaffolding, the system prompt with its tool list) are looked up, not encoded again
  (`_Segments`); a new plain-ASCII piece (a tool result, mostly) is split into words with
  the tokenizer's own pre-tokenizer pattern and its words looked up (`_Words`, for
  byte-level BPE tokenizers of the Qwen/Llama 3 kind). Sampled ids are decoded through a
  per-id byte table where the decoder is byte-level (`_ByteDecoder`), checked against the
  tokenizer's decode on the first decodes.
- Opening prompts are memoised by content (a GRPO group's episodes share their prompt).

It does not parse tool calls (`chat/parse.py`) or hold a conversation (`chat/render.py`).
Called by `rollout/episode.py`; tested in tests/test_turns.py against `ChatFormat`.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec

from trustee.chat.render import ChatFormat
from trustee.types import Message

log = logging.getLogger("trustee.rollout")

_MARK = "\x00trustee-content-"
_PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x7e]*")  # the text `_Words` encodes itself
_VERBATIM_ROLES = ("system", "user", "tool")

Shape = tuple[str, bool, tuple[tuple[str, str | None], ...]]


@dataclass(frozen=True)
class _Pieces:
    """Rendered text of one shape split at its contents: pieces[0] + c[order[0]] +
    pieces[1] + ... + pieces[-1]."""

    pieces: tuple[str, ...]
    order: tuple[int, ...]

    def fill(self, contents: list[str]) -> str:
        out = [self.pieces[0]]
        for k, i in enumerate(self.order):
            out.append(contents[i])
            out.append(self.pieces[k + 1])
        return "".join(out)


def _sentinel(tag: str, i: int) -> str:
    return f"{_MARK}{tag}{i}\x00"


def _split(text: str, n: int, tag: str) -> _Pieces | None:
    """Split `text` at the n sentinels of `tag`; None unless each appears exactly once."""
    found = []
    for i in range(n):
        s = _sentinel(tag, i)
        if text.count(s) != 1:
            return None
        found.append((text.index(s), i, s))
    found.sort()
    pieces, order, pos = [], [], 0
    for at, i, s in found:
        pieces.append(text[pos:at])
        order.append(i)
        pos = at + len(s)
    pieces.append(text[pos:])
    return _Pieces(tuple(pieces), tuple(order))


class TurnRenderer:
    """Ids of opening prompts and environment turns for one `ChatFormat` (one tool set)."""

    def __init__(
        self, fmt: ChatFormat, *, verify_uses: int = 2, prompt_cache: int = 64, segment_cache: int = 256
    ):
        self.fmt = fmt
        self.eos_id = fmt.eos_id
        self.verify_uses = verify_uses
        self._prompt_cache = prompt_cache
        self._shapes: dict[Shape, _Pieces | None] = {}
        self._checked: dict[Shape, int] = {}
        self._prompts: OrderedDict[bytes, list[int]] = OrderedDict()
        tok = fmt.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        self._backend = backend if backend is not None and hasattr(backend, "encode_batch") else None
        self._encode_whole = _fast_encoder(self._backend) if self._backend is not None else None
        self._backend_checked = 0
        self.verify_encodes = max(verify_uses, 16)
        self._segments = _Segments.build(self._backend, segment_cache) if self._backend is not None else None
        # tokenizer.decode post-processes only with clean_up_tokenization_spaces on
        self._fast_decode = self._backend is not None and not getattr(
            tok, "clean_up_tokenization_spaces", True
        )
        self._bytes = _ByteDecoder.build(self._backend) if self._fast_decode else None
        self._decode_checked = 0
        self.template_renders = 0  # how often the template had to run (for tests and the benchmark)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        if self._backend is None:
            return self.fmt.encode(text)
        if self._segments is not None:
            ids = self._segments.encode(text)
        else:
            ids = self._encode_whole(text)
        if self._backend_checked < self.verify_encodes:
            self._backend_checked += 1
            ref = self.fmt.encode(text)
            if ids != ref:
                log.warning(
                    "fast tokenizer path disagrees with tokenizer.encode on %r; using tokenizer.encode",
                    text[:80],
                )
                self._backend = self._segments = None
                self._fast_decode = False
                return ref
        return ids

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=False)`."""
        if self._bytes is not None:
            text = self._bytes.decode(ids)
            if self._decode_checked >= self.verify_encodes:
                return text
            self._decode_checked += 1
            ref = self._backend.decode(ids, skip_special_tokens=False)
            if text == ref:
                return text
            log.warning(
                "byte-level decode table disagrees with the tokenizer on %r; using the tokenizer", ref[:80]
            )
            self._bytes = None
            return ref
        if self._fast_decode:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self.fmt.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ rendering

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """`ChatFormat.prompt_ids(messages)`."""
        key = msgspec.json.encode(messages)
        hit = self._prompts.get(key)
        if hit is not None:
            self._prompts.move_to_end(key)
            return list(hit)
        ids = self.encode(self._text(messages, "prompt", True))
        self._prompts[key] = ids
        if len(self._prompts) > self._prompt_cache:
            self._prompts.popitem(last=False)
        return list(ids)

    def continuation_ids(self, new: list[Message], *, generation_prompt: bool = True) -> list[int]:
        """`ChatFormat.continuation_ids(new, generation_prompt=...)`."""
        return self.encode(self._text(new, "cont", generation_prompt))

    def _template_text(self, messages: list[Message], kind: str, gen: bool) -> str:
        self.template_renders += 1
        if kind == "prompt":
            return self.fmt.render_text(messages, generation_prompt=gen)
        return self.fmt.continuation_text(messages, generation_prompt=gen)

    def _text(self, messages: list[Message], kind: str, gen: bool) -> str:
        if not all(_verbatim(m) for m in messages):
            return self._template_text(messages, kind, gen)
        shape: Shape = (kind, gen, tuple((m.role, m.name) for m in messages))
        if shape not in self._shapes:
            self._shapes[shape] = self._build(messages, kind, gen)
            self._checked[shape] = 0
        pieces = self._shapes[shape]
        if pieces is None:
            return self._template_text(messages, kind, gen)
        text = pieces.fill([m.content for m in messages])
        if self._checked[shape] < self.verify_uses:
            self._checked[shape] += 1
            ref = self._template_text(messages, kind, gen)
            if text != ref:
                log.warning(
                    "chat template does not insert contents verbatim for %s; rendering those turns in full",
                    shape,
                )
                self._shapes[shape] = None
                return ref
        return text

    def _build(self, messages: list[Message], kind: str, gen: bool) -> _Pieces | None:
        def with_marks(tag: str) -> list[Message]:
            return [msgspec.structs.replace(m, content=_sentinel(tag, i)) for i, m in enumerate(messages)]

        a = _split(self._template_text(with_marks("a"), kind, gen), len(messages), "a")
        b_text = self._template_text(with_marks("b"), kind, gen)
        if a is None or a.fill([_sentinel("b", i) for i in range(len(messages))]) != b_text:
            log.warning("chat template output for %s is not content-substitutable; rendering in full", kind)
            return None
        return a


class _Segments:
    """`backend.encode(text, add_special_tokens=False).ids`, assembled from the pieces of
    `text` between added tokens, each piece's ids memoised (LRU).

    The tokenizers library cuts a text at its added tokens before normalising and
    pre-tokenizing, and handles each piece on its own; so the ids of a text are the ids of
    its pieces with the added tokens' ids between them. A rendered turn is mostly template
    scaffolding between special tokens ("user\\n", "assistant\\n", the system prompt with
    the tool list), which repeats every turn and is looked up; only the pieces holding new
    content are encoded. Built only where that cutting is exact: added tokens that match the
    raw text with no strip or single-word rule, no `encode_special_tokens`, no pre-tokenizer
    that treats the start of the text specially (Metaspace); and the renderer still compares
    its first encodes with `tokenizer.encode`.
    """

    def __init__(self, backend: Any, tokens: dict[str, int], cache: int):
        self._backend = backend
        self._ids = tokens
        # Longest first: at one position the regex takes the first alternative that matches,
        # which is then the longest (the library's leftmost-longest match).
        alts = sorted(tokens, key=len, reverse=True)
        # One capturing group: `split` returns text, token, text, token, ..., text (in C).
        self._cut = re.compile("(" + "|".join(re.escape(t) for t in alts) + ")")
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._cache = cache
        self._encode = _fast_encoder(backend)
        self._words = _Words.build(backend)

    @classmethod
    def build(cls, backend: Any, cache: int) -> _Segments | None:
        try:
            if getattr(backend, "encode_special_tokens", False):
                return None
            if "Metaspace" in repr(backend.pre_tokenizer):
                return None
            added = backend.get_added_tokens_decoder()
        except Exception:  # noqa: BLE001 - an unusual backend: encode whole texts instead
            return None
        tokens = {}
        for i, t in added.items():
            if t.lstrip or t.rstrip or t.single_word:
                return None
            if not t.normalized and t.content:
                tokens[t.content] = i
        if not tokens or cache < 1:
            return None
        return cls(backend, tokens, cache)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        parts = self._cut.split(text)
        added, piece = self._ids, self._piece
        for i in range(0, len(parts) - 1, 2):
            if parts[i]:
                out += piece(parts[i])
            out.append(added[parts[i + 1]])
        if parts[-1]:
            out += piece(parts[-1])
        return out

    def _piece(self, piece: str) -> list[int]:
        hit = self._memo.get(piece)
        if hit is not None:
            self._memo.move_to_end(piece)
            return hit
        ids = self._words.encode(piece) if self._words is not None else None
        if ids is None:
            ids = self._encode(piece)
        self._memo[piece] = ids
        if len(self._memo) > self._cache:
            self._memo.popitem(last=False)
        return ids


class _Words:
    """Ids of a plain-ASCII piece for a byte-level BPE tokenizer whose pre-tokenizer is one
    regex split (`Split(pattern, "Isolated")`) then `ByteLevel` without its own regex and
    without a prefix space, with no normalizer and no BPE dropout (Qwen2/3, Llama 3 and
    their kind): the piece is split with the same pattern here (its `\\p{L}` and `\\p{N}` as
    ASCII ranges for the standard `re` module, or as written for the `regex` module when it
    uses other Unicode properties; on ASCII text these classes and `\\s` are the library's),
    and each word's ids come from a memo, or from the BPE model on its byte-level form, as
    the library does per word. A tool result is mostly words seen before (JSON keys,
    punctuation, digits), so most of a new piece is looked up. Pieces with other characters
    (non-ASCII, control characters other than tab and newlines) return None: the library
    encodes them. The renderer compares its first encodes with `tokenizer.encode`; tests
    compare many more.
    """

    def __init__(self, model: Any, pattern: Any, cache: int):
        self._model = model
        self._split = pattern
        self._memo: dict[str, list[int]] = {}
        self._cache = cache
        # ASCII bytes to their byte-level characters (" " -> "Ġ", "\\n" -> "Ċ", ...)
        self._byte_level = str.maketrans({chr(b): c for c, b in _byte_chars().items() if b < 128})

    @classmethod
    def build(cls, backend: Any, cache: int = 65536) -> _Words | None:
        try:
            import json

            import regex
            from tokenizers import models

            if backend.normalizer is not None or type(backend.model) is not models.BPE:
                return None
            # Added tokens matched after normalisation are not cut out by _Segments: their
            # text can reach a piece, where only the library knows to match them.
            if any(t.normalized and t.content for t in backend.get_added_tokens_decoder().values()):
                return None
            if (
                backend.model.dropout
                or backend.model.continuing_subword_prefix
                or backend.model.end_of_word_suffix
            ):
                return None
            spec = json.loads(backend.pre_tokenizer.__getstate__())
            if spec.get("type") != "Sequence" or len(spec.get("pretokenizers", [])) != 2:
                return None
            split, level = spec["pretokenizers"]
            if (
                split.get("type") != "Split"
                or split.get("behavior") != "Isolated"
                or split.get("invert")
                or "Regex" not in split.get("pattern", {})
            ):
                return None
            if level.get("type") != "ByteLevel" or level.get("add_prefix_space") or level.get("use_regex"):
                return None
            source = split["pattern"]["Regex"]
            ascii_source = _ascii_pattern(source)
            # Only plain-ASCII pieces are split here, so the letter and digit classes can be
            # their ASCII ranges, which the standard `re` module matches about twice as fast.
            pattern = re.compile(ascii_source) if ascii_source is not None else regex.compile(source)
        except Exception:  # noqa: BLE001 - an unusual backend (or no `regex` module): the library encodes
            return None
        return cls(backend.model, pattern, cache)

    def encode(self, piece: str) -> list[int] | None:
        if _PLAIN_ASCII.fullmatch(piece) is None:
            return None
        out: list[int] = []
        memo = self._memo
        for word in self._split.findall(piece):
            ids = memo.get(word)
            if ids is None:
                ids = [t.id for t in self._model.tokenize(word.translate(self._byte_level))]
                if len(memo) >= self._cache:
                    memo.clear()
                memo[word] = ids
            out += ids
        return out


_ASCII_CLASSES = {r"\p{L}": "a-zA-Z", r"\p{N}": "0-9"}


def _ascii_pattern(source: str) -> str | None:
    """`source` with `\\p{L}` and `\\p{N}` written as their ASCII ranges (in a bracketed class
    or alone), so the standard `re` module can compile it and agree with the Unicode pattern
    on ASCII text; None if it uses any other Unicode property."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(source):
        c = source[i]
        if c == "\\":
            ranges = _ASCII_CLASSES.get(source[i : i + 5])
            if ranges is not None:
                out.append(ranges if in_class else f"[{ranges}]")
                i += 5
                continue
            if source[i + 1 : i + 2] in ("p", "P"):
                return None
            out.append(source[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            # a "]" first in a class (after any "^") is a literal, not its end
            j = i + 1 + (source[i + 1 : i + 2] == "^")
            if source[j : j + 1] == "]":
                out.append(source[i : j + 1])
                i = j + 1
                continue
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _byte_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's `bytes_to_unicode`), inverted: char -> byte."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class _ByteDecoder:
    """`backend.decode(ids, skip_special_tokens=False)` for a byte-level BPE tokenizer whose
    decoder is `ByteLevel` alone: each id's bytes (its token's characters mapped back through
    the byte alphabet; a token with other characters, e.g. an added token, as its UTF-8),
    joined and decoded as UTF-8 with replacement, which is what that decoder does. Ids the
    tokenizer does not know decode to nothing, as there. Each id's bytes are worked out once.
    The renderer compares its first decodes with the tokenizer's.
    """

    def __init__(self, backend: Any, chars: dict[str, int]):
        self._backend = backend
        self._chars = chars
        self._table: dict[int, bytes] = {}

    @classmethod
    def build(cls, backend: Any) -> _ByteDecoder | None:
        try:
            from tokenizers import decoders, pre_tokenizers

            if type(backend.decoder) is not decoders.ByteLevel:
                return None
            chars = _byte_chars()
            if set(chars) != set(pre_tokenizers.ByteLevel.alphabet()):
                return None
        except Exception:  # noqa: BLE001 - an unusual backend: let it decode
            return None
        return cls(backend, chars)

    def _bytes_of(self, i: int) -> bytes:
        tok = self._backend.id_to_token(i)
        if tok is None:
            out = b""
        else:
            try:
                out = bytes(self._chars[c] for c in tok)
            except KeyError:
                out = tok.encode()
        self._table[i] = out
        return out

    def decode(self, ids: list[int]) -> str:
        t = self._table
        try:
            raw = b"".join(map(t.__getitem__, ids))
        except KeyError:
            raw = b"".join([t[i] if i in t else self._bytes_of(i) for i in ids])
        return raw.decode("utf-8", "replace")


def _fast_encoder(backend: Any) -> Any:
    """`text -> backend.encode(text, add_special_tokens=False).ids`, through `encode_batch_fast`
    where the backend has it (tokenizers >= 0.21): the same ids without computing character
    offsets, about a third less time on a short text."""
    batch = getattr(backend, "encode_batch_fast", None)
    if batch is None:
        return lambda text: backend.encode(text, add_special_tokens=False).ids
    return lambda text: batch([text], add_special_tokens=False)[0].ids


def _verbatim(m: Message) -> bool:
    return m.role in _VERBATIM_ROLES and not m.tool_calls and not m.reasoning and _MARK not in m.content
