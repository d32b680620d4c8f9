"""Which tokens of a model's vocabulary are special: never sampled, so never in an answer.

llama.cpp renders a USER_DEFINED token's text whatever ``special`` says
(``llama_token_to_piece``), and Gemma 3's GGUF marks its image placeholders
``<start_of_image>``/``<end_of_image>`` USER_DEFINED: the base model samples them (seed 1 of
"Write a short poem about the sea:" starts with one) and they reached the shipped answers as
text. llama-server shows them too. Control tokens render as nothing, which hides that the
model went off the rails (``<start_of_turn>`` in the middle of an answer).

So both engines mask these tokens out of every draw (``Sampler``), after any ``logit_bias``;
a request that gives one a positive bias is refused (400), never silently ignored. The
end-of-generation tokens (``llama_vocab_is_eog``) are not masked: sampling one ends the
answer. Everything else USER_DEFINED is ordinary text (Gemma's whitespace runs and HTML tags).
"""

from __future__ import annotations

import re
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np
import numpy.typing as npt

TokenIds = npt.NDArray[np.intp]

# Never text: control tokens (<pad>, <start_of_turn>, <|im_start|>), UNUSED and UNKNOWN ones.
_NEVER_TEXT = (
    lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNUSED | lib.LLAMA_TOKEN_ATTR_UNKNOWN
)
# A USER_DEFINED token whose whole text has a special token's shape (as llama.cpp's
# convert_hf_to_gguf.py `does_token_look_special` judges, plus tag names with "_" and
# bracketed words, which no HTML tag has): Gemma 3's <start_of_image>, <end_of_image>,
# [multimodal], <image_soft_token>; StarCoder-style <file_sep>, <jupyter_code>.
_LOOKS_SPECIAL = re.compile(
    r"<\|.+\|>|<｜.+｜>|<[^<>\s]*_[^<>\s]*>|\[[A-Za-z_/@]+\]|<unused\d+>"
    r"|</?(?:pad|unk|mask|bos|eos|eot|cls|sep)>|<2mass>",
    re.IGNORECASE,
)


def special_tokens(vocab: Any) -> TokenIds:
    """The ids of ``vocab``'s special tokens that do not end generation, sorted."""
    n_vocab = int(lib.llama_vocab_n_tokens(vocab))
    attr = lib.llama_vocab_get_attr
    special = []
    for token in range(n_vocab):
        a = int(attr(vocab, token))
        if a & lib.LLAMA_TOKEN_ATTR_NORMAL or a & lib.LLAMA_TOKEN_ATTR_BYTE:
            continue
        if lib.llama_vocab_is_eog(vocab, token):
            continue
        if a & _NEVER_TEXT or (
            a & lib.LLAMA_TOKEN_ATTR_USER_DEFINED and _looks_special(vocab, token)
        ):
            special.append(token)
    return np.array(special, dtype=np.intp)


def _looks_special(vocab: Any, token: int) -> bool:
    text = lib.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")
    return bool(_LOOKS_SPECIAL.fullmatch(text))


def token_text(vocab: Any, token: int) -> str:
    """A token's text as the vocabulary stores it (for messages)."""
    return str(lib.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace"))
