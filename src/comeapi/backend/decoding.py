"""From a request to prompt tokens, and from generated tokens back to text.

The chat template, the context-length check, prompt-prefix reuse, incremental UTF-8 decoding,
stop strings and the offsets of log-probability entries live here, apart from any engine, so
every engine tokenizes, reuses and stops the same way.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from comeapi.errors import ContextLengthError, RequestError
from comeapi.protocol.requests import GenerationRequest, Message
from comeapi.protocol.responses import TokenLogprob

# Prompt tokens per llama_decode call while prefilling, in both engines. A prompt's chunks
# start at position 0, so their boundaries depend only on the prompt; cells are reused from an
# earlier prompt in whole chunks only (reusable_prefix), which keeps reuse exact.
PREFILL_CHUNK = 128
# A function every tool-aware chat template renders somewhere in the prompt.
_PROBE_TOOL = "comeapi_probe_tool_7f3a"


class TokenizerLike(Protocol):
    """What this module needs of ``llama_cpp.Llama`` (or the batched engine's tokenizer)."""

    metadata: dict[str, str]

    def token_bos(self) -> int: ...

    def token_eos(self) -> int: ...

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int], *, special: bool = False) -> bytes: ...


# llama.cpp's built-in templates, for GGUF files that carry no chat template of their own
# (the bundled Gemma 3 base model has none).
_BUILTIN_BY_ARCH = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}
_FALLBACK_TEMPLATE = "chatml"


class ChatTemplate:
    """Renders messages with the GGUF's own Jinja template, else llama.cpp's built-in one."""

    def __init__(self, llama: TokenizerLike):
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

    @property
    def supports_tools(self) -> bool:
        """True when the GGUF's Jinja template renders the ``tools`` it is given (a template
        that ignores them, or llama.cpp's built-in ones, cannot tell the model about tools)."""
        if self._jinja is None:
            return False
        tool: Any = {
            "type": "function",
            "function": {"name": _PROBE_TOOL, "description": "", "parameters": {}},
        }
        try:
            chat: Any = [{"role": "user", "content": "hi"}]
            result = self._jinja(messages=chat, tools=[tool])
        except Exception:  # the template refuses tools (or this message): no support
            return False
        return _PROBE_TOOL in result.prompt

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


def _token_text(llama: TokenizerLike, token: int) -> str:
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", errors="replace")


def prompt_texts(template: ChatTemplate, request: GenerationRequest) -> list[str]:
    """The text of each prompt: the rendered chat, or each prompt of a completion."""
    if request.kind != "chat":
        return list(request.prompts or (request.prompt or "",))
    assert request.messages is not None
    if request.tools and request.tool_choice != "none":
        why = (
            "comeapi's engines do not call tools yet"
            if template.supports_tools
            else "this model's chat template has no tool support"
        )
        raise RequestError(f"tools: {why}", param="tools", code="unsupported_parameter")
    if request.tool_choice not in (None, "none", "auto"):
        raise RequestError("tool_choice: only allowed together with tools", param="tool_choice")
    return [template.render(request.messages)]


def tokenize_prompt(llama: TokenizerLike, text: str) -> list[int]:
    """A prompt as tokens (special tokens parsed, as a template writes them), BOS once."""
    tokens: list[int] = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    bos = llama.token_bos()
    while len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
        tokens.pop(0)  # templates that write BOS themselves
    if not tokens:  # OpenAI's null prompt (a new document) on a model that has no BOS token
        raise RequestError(
            "prompt: this model has no beginning-of-sequence token to start a document from",
            param="prompt",
        )
    return tokens


def prompt_tokens(
    llama: TokenizerLike, template: ChatTemplate, request: GenerationRequest
) -> list[int]:
    """The request's (first) prompt as tokens."""
    return tokenize_prompt(llama, prompt_texts(template, request)[0])


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading cells computed for ``cached`` (a prompt prefilled in PREFILL_CHUNK
    chunks from position 0) ``prompt`` can keep: whole chunks of their common prefix only, so
    the rest is computed in the chunks a fresh prefill would use (a cell is the same to the
    bit); and at least one prompt token is left to compute the next token's logits."""
    limit = min(len(cached), len(prompt) - 1)
    common = 0
    while common < limit and cached[common] == prompt[common]:
        common += 1
    return common // PREFILL_CHUNK * PREFILL_CHUNK


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
        self.decoded = 0  # characters decoded so far, sent or held

    def feed(self, data: bytes) -> str:
        """The text that is safe to send now; sets ``stopped`` when a stop string appeared."""
        if self.stopped:
            return ""
        text = self._decoder.decode(data)
        self.decoded += len(text)
        return self._release(self._held + text)

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


class ChoiceText:
    """One choice's tokens in, its text pieces and their tokens' log probabilities out.

    A log-probability entry leaves with the piece that completes its token's text; at a stop
    string, the tokens that start at or after the cut are dropped with their text. Entries
    carry their offset in the choice's text (``base``: the echoed prompt before it).
    """

    def __init__(self, stop: Sequence[str], base: int = 0):
        self._text = TextAssembler(stop)
        self._base = base
        self._sent = 0
        self._pending: list[tuple[int, TokenLogprob]] = []  # (end in characters, entry)

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    def feed(
        self, piece: bytes, entry: TokenLogprob | None = None
    ) -> tuple[str, list[TokenLogprob]]:
        start = self._text.decoded
        text = self._text.feed(piece)
        self._sent += len(text)
        if entry is not None:
            offset = self._base + start
            self._pending.append((self._text.decoded, dataclasses.replace(entry, offset=offset)))
        if self._text.stopped:
            return text, self._release(lambda end, e: e.offset < self._base + self._sent)
        return text, self._release(lambda end, e: end <= self._sent)

    def finish(self) -> tuple[str, list[TokenLogprob]]:
        text = self._text.flush()
        self._sent += len(text)
        if self._text.stopped:
            return text, self._release(lambda end, e: e.offset < self._base + self._sent)
        return text, self._release(lambda end, e: True)

    def _release(self, keep: Any) -> list[TokenLogprob]:
        out: list[TokenLogprob] = []
        while self._pending and keep(*self._pending[0]):
            out.append(self._pending.pop(0)[1])
        if self._text.stopped:
            self._pending.clear()  # what is left is the stop string and after: never sent
        return out


def prompt_logprobs(
    llama: TokenizerLike, tokens: Sequence[int], entries: Sequence[TokenLogprob | None]
) -> list[TokenLogprob]:
    """Log-probability entries for an echoed prompt: ``entries[i]`` scores ``tokens[i]``
    (None for the first), offsets in the prompt's text; the BOS token (no text) is left out."""
    out: list[TokenLogprob] = []
    offset = 0
    bos = llama.token_bos()
    for i, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        if i == 0 and token == bos:
            continue
        raw = llama.detokenize([token])
        if entry is None:
            entry = TokenLogprob(raw.decode("utf-8", errors="replace"), raw, None)
        out.append(dataclasses.replace(entry, offset=offset))
        offset += len(raw.decode("utf-8", errors="replace"))
    return out
