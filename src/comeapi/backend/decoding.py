"""From a request to prompt tokens, and from generated tokens back to text.

The chat template, the context-length check, incremental UTF-8 decoding and stop strings live
here, apart from any engine, so every engine tokenizes and stops the same way.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from comeapi.errors import ContextLengthError, RequestError
from comeapi.protocol.requests import GenerationRequest, Message

# llama.cpp's built-in templates, for GGUF files that carry no chat template of their own
# (the bundled Gemma 3 base model has none).
_BUILTIN_BY_ARCH = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}
_FALLBACK_TEMPLATE = "chatml"


class ChatTemplate:
    """Renders messages with the GGUF's own Jinja template, else llama.cpp's built-in one."""

    def __init__(self, llama: llama_cpp.Llama):
        metadata: dict[str, str] = llama.metadata
        template = metadata.get("tokenizer.chat_template")
        self._jinja: Jinja2ChatFormatter | None = None
        self._builtin = b""
        if template:
            self._jinja = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(llama, llama.token_eos()),
                bos_token=_token_text(llama, llama.token_bos()),
            )
        else:
            arch = metadata.get("general.architecture", "")
            self._builtin = _BUILTIN_BY_ARCH.get(arch, _FALLBACK_TEMPLATE).encode()

    @property
    def name(self) -> str:
        return "gguf" if self._jinja is not None else self._builtin.decode()

    def render(self, messages: Sequence[Message]) -> str:
        if self._jinja is not None:
            try:
                chat: Any = [m.to_dict() for m in messages]  # llama_cpp's TypedDicts
                result = self._jinja(messages=chat)
            except Exception as exc:  # the template's raise_exception(): e.g. bad role order
                raise RequestError(f"messages: {exc}", param="messages") from None
            return result.prompt
        return _apply_builtin(self._builtin, messages)


def _apply_builtin(template: bytes, messages: Sequence[Message]) -> str:
    encoded = [(m.role.encode(), m.content.encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(encoded))(
        *[llama_cpp.llama_chat_message(role, content) for role, content in encoded]
    )
    size = 2 * sum(len(r) + len(c) for r, c in encoded) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template, chat, len(encoded), True, buf, size)
        if n < 0:
            raise RequestError("messages cannot be rendered with the chat template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n  # the buffer was too small; n is the size needed
    raise RequestError("messages cannot be rendered with the chat template")


def _token_text(llama: llama_cpp.Llama, token: int) -> str:
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", errors="replace")


def prompt_tokens(
    llama: llama_cpp.Llama, template: ChatTemplate, request: GenerationRequest
) -> list[int]:
    """The request's prompt as tokens (chat rendered with the template), BOS exactly once."""
    if request.kind == "chat":
        assert request.messages is not None
        text = template.render(request.messages)
    else:
        assert request.prompt is not None
        text = request.prompt
    tokens: list[int] = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    bos = llama.token_bos()
    while len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
        tokens.pop(0)  # templates that write BOS themselves
    return tokens


def completion_budget(request: GenerationRequest, n_prompt: int, n_ctx: int) -> int:
    """How many tokens may be generated; ContextLengthError if the request cannot fit."""
    max_tokens = request.max_tokens
    if n_prompt >= n_ctx:
        raise ContextLengthError(
            f"the prompt is {n_prompt} tokens, this model's context is {n_ctx} tokens",
            param="messages" if request.kind == "chat" else "prompt",
        )
    if max_tokens is None:
        return n_ctx - n_prompt
    if n_prompt + max_tokens > n_ctx:
        raise ContextLengthError(
            f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is more than "
            f"this model's context of {n_ctx} tokens",
            param="max_tokens",
        )
    return max_tokens


class TextAssembler:
    """Token bytes in, text pieces out: whole UTF-8 characters only, and nothing past a stop
    string (text that might be the start of one is held back until it is known not to be)."""

    def __init__(self, stop: Sequence[str]):
        self._decoder: Any = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """The text that is safe to send now; sets ``stopped`` when a stop string appeared."""
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(data))

    def flush(self) -> str:
        """The held-back text at the end of the generation.

        A character cut in half by max_tokens is dropped, not sent as U+FFFD: the client
        asked for at most N tokens, not for a broken character."""
        if self.stopped:
            return ""
        text = self._held
        self._held = ""
        self._decoder.reset()
        return self._cut(text) if self._stop else text

    def _release(self, text: str) -> str:
        if not self._stop:
            return text
        cut = self._cut(text)
        if self.stopped:
            self._held = ""
            return cut
        keep = max((_partial_suffix(text, s) for s in self._stop), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _cut(self, text: str) -> str:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
