"""The prompt set: which prompts the cache answers, how many variants, generated how.

A YAML (or JSON) file::

    model: smollm2-135m-instruct-q4_1.gguf  # default: the bundled default model
    variants: 5                         # default: the `variants` setting (5)
    max_tokens: 64                      # generation parameters for every prompt ...
    temperature: 0.8
    stop: "\n\n"                        # (optional: a string or up to 4)
    checks: {truncated: reject}         # what the quality checks do (default: cache/checks.py)
    prompts:
      - prompt: "こんにちは"              # /generate and /v1/completions
      - prompt: "Once upon a time"
        max_tokens: 32                  # ... overridable per prompt
      - messages:                       # /v1/chat/completions
          - {role: user, content: "How do I boil an egg?"}
        same: ["How should I boil an egg?", "卵はどうやってゆでますか？"]
        not: ["How do I fry an egg?"]

``same:`` and ``not:`` are labelled examples for similar matching (``comeapi.similar``):
queries that deserve this item's answers, and near neighbours that need another answer. For a
chat item they are the last user message. Every error names the file, the field and the line.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comeapi.cache.checks import ACTIONS, CHECKS, Action, CheckPolicy
from comeapi.cache.key import chat_key, normalise, prompt_key
from comeapi.cache.store import EntryKind
from comeapi.errors import ConfigError
from comeapi.models.bundled import BUNDLED_MODEL

DEFAULT_MODEL = BUNDLED_MODEL
ROLES = ("system", "developer", "user", "assistant")
# ComeAPI's /generate defaults, with a shorter answer: cached answers are read, not streamed
# for minutes, and the shipped data stays small.
DEFAULT_PARAMS: dict[str, Any] = {"max_tokens": 64, "temperature": 0.8, "top_k": 40, "top_p": 0.9}
# Optional parameters, sent only when the file gives them.
OPTIONAL_PARAMS = ("stop",)
_SET_FIELDS = ("model", "variants", *DEFAULT_PARAMS, *OPTIONAL_PARAMS, "checks", "prompts")
_ITEM_FIELDS = ("prompt", "messages", *DEFAULT_PARAMS, *OPTIONAL_PARAMS, "same", "not")
MAX_EXAMPLES = 1000  # per list: calibration is quadratic in the examples

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class PromptItem:
    """One prompt of the set, with its cache key and generation parameters."""

    index: int
    kind: EntryKind
    prompt: str  # normalised; for chat, the last user message (for listings)
    messages: tuple[tuple[str, str], ...] | None
    model: str
    params: dict[str, Any]
    key: str
    line: int | None = None
    same: tuple[str, ...] = ()  # labelled paraphrases (normalised), for similar matching
    not_: tuple[str, ...] = ()  # labelled near neighbours that need another answer

    @property
    def route(self) -> str:
        """The OpenAI route that generates this item's answers."""
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    def request_body(self, variant: int) -> dict[str, Any]:
        """The body that generates variant ``variant`` (seeded with it, so reproducible)."""
        body: dict[str, Any] = {"model": self.model, **self.params, "seed": variant}
        if self.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


@dataclass(frozen=True, slots=True)
class PromptSet:
    source: str
    model: str
    variants: int | None  # None: the file leaves it to the `variants` setting
    items: tuple[PromptItem, ...] = field(default_factory=tuple)
    checks: dict[str, Action] = field(default_factory=dict)  # what the file says of each check

    def by_key(self) -> dict[str, PromptItem]:
        return {item.key: item for item in self.items}

    def policy(self, overrides: Sequence[str] = ()) -> CheckPolicy:
        """The checks' policy: the defaults, then this file's ``checks``, then ``overrides``
        (the ``checks`` setting, NAME=ACTION)."""
        return CheckPolicy.parse(overrides, CheckPolicy().updated(self.checks))


def shipped_prompts_path() -> Path:
    return Path(str(importlib.resources.files("comeapi") / "data" / "prompts.yaml"))


def load_prompt_set(path: Path | None = None) -> PromptSet:
    """The prompt set in ``path`` (default: the shipped one); ConfigError naming line and field."""
    path = path or shipped_prompts_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt set {path}: cannot read: {exc}", param="prompts") from exc
    return parse_prompt_set(text, path.name)


def parse_prompt_set(text: str, source: str) -> PromptSet:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{source}: not valid YAML/JSON: {problem}{where}", param="prompts"
        ) from None
    return _Parser(source, root).parse(data)


class _Parser:
    def __init__(self, source: str, root: yaml.Node | None):
        self.source = source
        self.root = root
        self.errors: list[str] = []

    def error(self, path: FieldPath, message: str) -> None:
        where = _dotted(path)
        line = _line(self.root, path)
        self.errors.append(
            f"{self.source}: {where + ': ' if where else ''}{message}"
            + (f", line {line}" if line else "")
        )

    def parse(self, data: Any) -> PromptSet:
        self._duplicate_keys(self.root, ())
        if not isinstance(data, dict):
            self.error((), "must be a mapping with a 'prompts' list")
            self.raise_errors()
        self._unknown(data, (), _SET_FIELDS)
        model = data.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or not model.strip():
            self.error(("model",), "must be a model file name, e.g. " + DEFAULT_MODEL)
            model = DEFAULT_MODEL
        variants = data.get("variants")
        if variants is not None and not _int_in(variants, 1, 100):
            self.error(("variants",), f"must be an integer from 1 to 100 (got {variants!r})")
        base = self._params(data, (), DEFAULT_PARAMS)
        checks = self._checks(data.get("checks", {}))
        prompts = data.get("prompts")
        items: list[PromptItem] = []
        if not isinstance(prompts, list) or not prompts:
            self.error(("prompts",), "must be a non-empty list of prompt or messages items")
        else:
            seen: dict[str, int] = {}
            for i, raw in enumerate(prompts):
                item = self._item(i, raw, model.strip(), base)
                if item is None:
                    continue
                if item.key in seen:
                    self.error(
                        ("prompts", i),
                        f"same prompt as prompts[{seen[item.key]}] after normalisation "
                        "(Unicode NFC, line endings, surrounding whitespace)",
                    )
                seen.setdefault(item.key, i)
                items.append(item)
            self._conflicting_examples(items)
        self.raise_errors()
        return PromptSet(self.source, model.strip(), variants, tuple(items), checks)

    def _conflicting_examples(self, items: list[PromptItem]) -> None:
        """A paraphrase cannot deserve two prompts' answers: the labels would contradict."""
        owner: dict[str, int] = {}
        for item in items:
            for text in item.same:
                if text in owner and owner[text] != item.index:
                    self.error(
                        (*("prompts", item.index), "same"),
                        f"{text!r} is also under prompts[{owner[text]}].same",
                    )
                owner.setdefault(text, item.index)

    def raise_errors(self) -> None:
        if self.errors:
            shown = self.errors[:20]
            if len(self.errors) > 20:
                shown.append(f"... and {len(self.errors) - 20} more")
            raise ConfigError("\n".join(shown), param="prompts")

    def _item(self, i: int, raw: Any, model: str, base: dict[str, Any]) -> PromptItem | None:
        path: FieldPath = ("prompts", i)
        line = _line(self.root, path)
        if isinstance(raw, str):  # shorthand: a bare string is a prompt item
            raw = {"prompt": raw}
        if not isinstance(raw, dict):
            self.error(path, "must be a mapping with 'prompt' or 'messages'")
            return None
        self._unknown(raw, path, _ITEM_FIELDS)
        params = self._params(raw, path, base)
        same = self._examples(raw, path, "same")
        not_ = self._examples(raw, path, "not")
        for text in sorted(set(same) & set(not_)):
            self.error((*path, "not"), f"{text!r} is also listed under 'same'")
        if ("prompt" in raw) == ("messages" in raw):
            self.error(path, "needs exactly one of 'prompt' or 'messages'")
            return None
        if "prompt" in raw:
            text = raw["prompt"]
            if not isinstance(text, str) or not normalise(text):
                self.error((*path, "prompt"), "must be a non-empty string")
                return None
            prompt = normalise(text)
            key = prompt_key(prompt, model)
            return PromptItem(i, "prompt", prompt, None, model, params, key, line, same, not_)
        messages = self._messages(raw["messages"], (*path, "messages"))
        if messages is None:
            return None
        users = [c for r, c in messages if r == "user"]
        shown = users[-1] if users else messages[-1][1]
        key = chat_key(messages, model)
        return PromptItem(i, "chat", shown, messages, model, params, key, line, same, not_)

    def _examples(self, raw: dict[str, Any], path: FieldPath, name: str) -> tuple[str, ...]:
        """The ``same``/``not`` list of an item, normalised like a prompt; [] when absent."""
        if name not in raw:
            return ()
        values = raw[name]
        if not isinstance(values, list) or len(values) > MAX_EXAMPLES:
            self.error((*path, name), f"must be a list of at most {MAX_EXAMPLES} non-empty strings")
            return ()
        out: list[str] = []
        for j, value in enumerate(values):
            text = normalise(value) if isinstance(value, str) else ""
            if not text:
                self.error((*path, name, j), "must be a non-empty string")
            elif text in out:
                self.error((*path, name, j), f"{text!r} is listed twice")
            else:
                out.append(text)
        return tuple(out)

    def _checks(self, raw: Any) -> dict[str, Action]:
        if not isinstance(raw, dict):
            self.error(("checks",), "must be a mapping of check name to reject, flag or off")
            return {}
        checks: dict[str, Action] = {}
        for name, action in raw.items():
            if action is False:  # YAML 1.1 reads a bare `off` as false
                action = "off"
            if name not in CHECKS:
                self.error(("checks", str(name)), f"unknown check (known: {', '.join(CHECKS)})")
            elif action not in ACTIONS:
                self.error(("checks", str(name)), f"must be reject, flag or off (got {action!r})")
            else:
                checks[name] = action
        return checks

    def _messages(self, raw: Any, path: FieldPath) -> tuple[tuple[str, str], ...] | None:
        if not isinstance(raw, list) or not raw:
            self.error(path, "must be a non-empty list of {role, content} mappings")
            return None
        messages = []
        ok = True
        for j, m in enumerate(raw):
            mpath = (*path, j)
            if not isinstance(m, dict):
                self.error(mpath, "must be a mapping with 'role' and 'content'")
                ok = False
                continue
            self._unknown(m, mpath, ("role", "content"))
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                self.error((*mpath, "role"), f"must be one of {', '.join(ROLES)} (got {role!r})")
                ok = False
            if not isinstance(content, str) or not normalise(content):
                self.error((*mpath, "content"), "must be a non-empty string")
                ok = False
            if ok:
                messages.append((str(role), normalise(str(content))))
        return tuple(messages) if ok else None

    def _params(self, raw: dict[str, Any], path: FieldPath, base: dict[str, Any]) -> dict[str, Any]:
        params = dict(base)
        for name, check, expected in (
            ("max_tokens", lambda v: _int_in(v, 1, 1_000_000), "an integer >= 1"),
            ("temperature", lambda v: _num_in(v, 0.0, 2.0), "a number from 0 to 2"),
            ("top_k", lambda v: _int_in(v, 0, 1_000_000), "an integer >= 0"),
            ("top_p", lambda v: _num_in(v, 0.0, 1.0) and v > 0, "a number in (0, 1]"),
        ):
            if name not in raw:
                continue
            value = raw[name]
            if check(value):
                params[name] = float(value) if name in ("temperature", "top_p") else value
            else:
                self.error((*path, name), f"must be {expected} (got {value!r})")
        if "stop" in raw:  # OpenAI's: a string or up to 4; ends the answer (finish_reason stop)
            stop = raw["stop"]
            stops = [stop] if isinstance(stop, str) else stop
            if (
                isinstance(stops, list)
                and 1 <= len(stops) <= 4
                and all(isinstance(x, str) and x for x in stops)
            ):
                params["stop"] = list(stops)
            else:
                self.error((*path, "stop"), f"must be a string or up to 4 strings (got {stop!r})")
        return params

    def _unknown(self, raw: dict[str, Any], path: FieldPath, allowed: tuple[str, ...]) -> None:
        for name in raw:
            if name not in allowed:
                self.error(
                    (*path, str(name)), f"unknown field (expected one of {', '.join(allowed)})"
                )

    def _duplicate_keys(self, node: yaml.Node | None, path: FieldPath) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                name = str(k.value)
                if name in seen:
                    self.errors.append(
                        f"{self.source}: {_dotted((*path, name))}: duplicate key, "
                        f"line {k.start_mark.line + 1}"
                    )
                seen.add(name)
                self._duplicate_keys(v, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._duplicate_keys(v, (*path, i))


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _num_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _dotted(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _line(root: yaml.Node | None, path: FieldPath) -> int | None:
    """The 1-based line of the node at ``path`` (or of its nearest existing ancestor)."""
    if root is None:
        return None
    node = root
    for part in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if str(k.value) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node = child
    return int(node.start_mark.line) + 1
