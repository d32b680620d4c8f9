"""Quality checks of a generated answer: plain, deterministic rules with a name each.

Every cached answer is served to everyone who asks its prompt, so warmup scores each new
variant with ``check_answer`` and regenerates it when ``failing`` says the policy rejects
it; ``comeapi cache check`` runs the same rules over a whole store. The rules are textual
on purpose (no model, no vocabulary): the same answer gets the same flags everywhere.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from comeapi.errors import ConfigError

if TYPE_CHECKING:
    from comeapi.cache.store import Entry

#: Every check, with what it means (docs/cache.md, "Quality checks").
CHECKS: dict[str, str] = {
    "echo": "repeats the prompt or the system message",
    "empty": "is empty, or has no letter or digit (whitespace, a lone colon)",
    "language": "is not in the prompt's script (a Japanese prompt gets a Japanese answer)",
    "loop": "repeats itself (the same words over and over)",
    "markup": "contains HTML or chat-template markup the prompt did not ask for",
    "special_token": "contains a special token's text (<start_of_image>, <|im_end|>, [INST])",
    "truncated": "was cut at max_tokens in mid-sentence",
}
Action = Literal["reject", "flag", "off"]
ACTIONS: tuple[Action, ...] = ("reject", "flag", "off")
#: What each check does unless configured: a cut answer is flagged, not regenerated (a longer
#: max_tokens is the cure, not another seed); everything else is regenerated.
DEFAULT_ACTIONS: dict[str, Action] = {
    "echo": "reject",
    "empty": "reject",
    "language": "reject",
    "loop": "reject",
    "markup": "reject",
    "special_token": "reject",
    "truncated": "flag",
}

# Text that only a tokenizer's special tokens or a chat template write: a leaked token.
_SPECIAL = re.compile(
    r"<\|[^<>|\s]{1,40}\|>"  # ChatML and kin: <|im_end|>, <|endoftext|>, <|eot_id|>
    r"|<｜[^<>｜]{1,40}｜>"  # DeepSeek's full-width bars
    r"|</?(?:start|end)_of_[a-z_]+>"  # Gemma: <start_of_image>, <end_of_turn>
    r"|<unused\d+>|</?(?:pad|unk|mask|bos|eos|eot|s)>|<2mass>|\[@BOS@\]"
    r"|\[/?INST\]|<</?SYS>>|\[/?(?:multimodal|IMG|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS)\]"
    r"|<(?:image_soft_token|file_sep|repo_name|reponame|filename|gh_stars|issue_start"
    r"|issue_comment|issue_closed|jupyter_(?:start|text|code|output|script)|empty_output"
    r"|commit_(?:before|msg|after))>"
)
_HTML_TAG = re.compile(
    r"</?(?:a|abbr|b|bbox|big|blockquote|body|br|caption|center|code|dd|div|dl|dt|em|font"
    r"|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|li|link|main|meta|nav|ol|p"
    r"|pre|s|script|section|small|span|strong|style|sub|sup|table|tbody|td|tfoot|th|thead"
    r"|title|tr|u|ul)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
# A chat template's turn written out as text: a new turn the model invented.
_TURN = re.compile(
    r"^[ \t]*(?:#{2,}[ \t]*(?:Instruction|Response|Input)\b"
    r"|(?:User|Assistant|Human|System)[ \t]*:)",
    re.MULTILINE | re.IGNORECASE,
)
_ASKS_FOR_MARKUP = re.compile(r"\b(?:html|xml|markup|tags?)\b|<[a-z][a-z0-9]*[ >]", re.I)
# A sentence is over at one of these, maybe followed by closing quotes, brackets or emphasis
# (a quote or a colon alone is not an end: `or a "` and `try:` were cut), or a code block.
_SENTENCE_END = re.compile(r"(?:[.!?。！？…][\"'”’)）」』】\]*_]*|```)\s*$")

# Units for repetition: a tag, one CJK character, one word, or one other visible character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff66-\uff9f"
_UNIT = re.compile(rf"</?[a-z][a-z0-9]*>|[{_CJK}]|[^\W_{_CJK}]+|[^\w\s]")

# loop: an n-gram of LOOP_N units seen LOOP_REPEATS times, half the answer (by units) inside
# n-grams that occur more than once, or a phrase said three times in a row (measured on the
# answers of Gemma 3 base and SmolLM2, see tests).
LOOP_N = 4
LOOP_N_CJK = 6
LOOP_REPEATS = 4
LOOP_COVERAGE = 0.5
LOOP_MIN_UNITS = 12
# echo: the share of the prompt's (system message's) units that reappear in the answer in
# runs of at least two units ...
ECHO_PROMPT = 0.9
ECHO_SYSTEM = 0.6
ECHO_MIN_UNITS = 3
# ... or the share of the answer made of the prompt's words (an answer that adds nothing).
ECHO_ANSWER = 0.8
# language: share of the answer's letters in the prompt's script, and how many letters of a
# script the prompt does not use are tolerated (Latin is always allowed: code, names).
LANGUAGE_SHARE = 0.5
LANGUAGE_FOREIGN = 3


@dataclass(frozen=True, slots=True)
class CheckPolicy:
    """What each check does at generation: ``reject`` (regenerate), ``flag`` (keep, with the
    reason stored) or ``off`` (ignored)."""

    actions: Mapping[str, Action] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))

    def __post_init__(self) -> None:
        for name, action in self.actions.items():
            if name not in CHECKS:
                raise ConfigError(
                    f"checks: unknown check {name!r} (known: {', '.join(sorted(CHECKS))})",
                    param="checks",
                )
            if action not in ACTIONS:
                raise ConfigError(
                    f"checks: {name}: action must be one of {', '.join(ACTIONS)} (got {action!r})",
                    param="checks",
                )

    def action(self, name: str) -> Action:
        return self.actions.get(name, DEFAULT_ACTIONS.get(name, "reject"))

    @property
    def rejects(self) -> frozenset[str]:
        return frozenset(n for n in CHECKS if self.action(n) == "reject")

    @property
    def enabled(self) -> frozenset[str]:
        return frozenset(n for n in CHECKS if self.action(n) != "off")

    def updated(self, changes: Mapping[str, Action]) -> CheckPolicy:
        """This policy with ``changes`` on top (a later source overriding an earlier one)."""
        return CheckPolicy({**self.actions, **changes})

    @classmethod
    def parse(cls, specs: Iterable[str], base: CheckPolicy | None = None) -> CheckPolicy:
        """``["truncated=reject", "language=off"]`` (the ``checks`` setting) on ``base``."""
        changes: dict[str, Action] = {}
        for spec in specs:
            name, eq, action = (part.strip() for part in spec.partition("="))
            if not eq or action not in ACTIONS:
                raise ConfigError(
                    f"checks: expected NAME=reject|flag|off, got {spec!r}", param="checks"
                )
            changes[name] = action
        return (base or cls()).updated(changes)


def failing(flags: Iterable[str], policy: CheckPolicy | None = None) -> bool:
    """True when one of ``flags`` makes the answer rejected under ``policy``."""
    rejects = (policy or CheckPolicy()).rejects
    return any(flag in rejects for flag in flags)


def check_answer(
    text: str,
    *,
    kind: str,
    prompt: str,
    messages: tuple[tuple[str, str], ...] | None,
    finish_reason: str,
    policy: CheckPolicy | None = None,
) -> tuple[str, ...]:
    """The sorted names of the checks ``text`` fails (the ones ``policy`` leaves on).

    ``prompt`` is the completion prompt, or for a chat the last user message; ``messages``
    the whole chat (None for a completion). ``kind`` is ``prompt`` or ``chat``.
    """
    enabled = (policy or CheckPolicy()).enabled
    asked = prompt if messages is None else "\n".join(c for _, c in messages)
    flags: set[str] = set()
    if not any(ch.isalnum() for ch in text):
        flags.add("empty")
    if _SPECIAL.search(text):
        flags.add("special_token")
    if has_markup(text, asked):
        flags.add("markup")
    if is_loop(text):
        flags.add("loop")
    if is_echo(text, prompt, messages if kind == "chat" else None):
        flags.add("echo")
    if text.strip() and wrong_language(text, prompt):
        flags.add("language")
    if finish_reason == "length" and text.strip() and not _SENTENCE_END.search(text):
        flags.add("truncated")
    return tuple(sorted(flags & enabled))


def check_entry(entry: Entry, policy: CheckPolicy | None = None) -> tuple[str, ...]:
    """``check_answer`` of a stored answer (its current text)."""
    return check_answer(
        entry.answer,
        kind=entry.kind,
        prompt=entry.prompt,
        messages=entry.messages,
        finish_reason=entry.finish_reason,
        policy=policy,
    )


def has_markup(text: str, asked: str) -> bool:
    """HTML tags (unless the prompt asks for markup) or a chat turn written out as text."""
    if _TURN.search(text):
        return True
    return bool(_HTML_TAG.search(text)) and not _ASKS_FOR_MARKUP.search(asked)


def units(text: str) -> list[str]:
    """The text as repetition units: tags, CJK characters, lower-case words, other symbols."""
    return _UNIT.findall(text.lower())


def is_loop(text: str) -> bool:
    seq = units(text)
    if len(seq) < LOOP_MIN_UNITS:
        return False
    cjk = sum(1 for u in seq if len(u) == 1 and re.match(rf"[{_CJK}]", u))
    n = LOOP_N_CJK if cjk * 2 > len(seq) else LOOP_N
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    counts = Counter(grams)
    if counts and max(counts.values()) >= LOOP_REPEATS:
        return True
    if _stutters(seq):
        return True
    covered = [False] * len(seq)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    return sum(covered) >= LOOP_COVERAGE * len(seq)


def _stutters(seq: list[str]) -> bool:
    """A phrase of 2 to 8 units said three times in a row ("scientific computing,
    scientific computing, scientific computing")."""
    for n in range(2, 9):
        for i in range(len(seq) - 3 * n + 1):
            if seq[i : i + n] == seq[i + n : i + 2 * n] == seq[i + 2 * n : i + 3 * n]:
                return True
    return False


def is_echo(text: str, prompt: str, messages: Sequence[tuple[str, str]] | None) -> bool:
    """The answer repeats (nearly all of) the prompt or much of a system message, or is the
    prompt's own words and little else ("How are you today?" to "Hello, how are you
    today?")."""
    answer = units(text)
    sources = [(prompt, ECHO_PROMPT)]
    if messages is not None:
        sources += [(c, ECHO_SYSTEM) for r, c in messages if r in ("system", "developer")]
    for source, share in sources:
        found = _shared(units(source), answer)
        if found and (found / len(units(source)) >= share or found / len(answer) >= ECHO_ANSWER):
            return True
    return False


def _shared(source: list[str], answer: list[str]) -> int:
    """How many units of ``source`` are found in ``answer`` in runs of two or more."""
    if len(source) < ECHO_MIN_UNITS or not answer:
        return 0
    matcher = difflib.SequenceMatcher(None, source, answer, autojunk=False)
    return sum(b.size for b in matcher.get_matching_blocks() if b.size >= 2)


def script(char: str) -> str | None:
    """The writing system of a letter: ``japanese`` (kana; kanji count as ``han``), ``han``,
    ``hangul``, ``latin``, ``cyrillic``...; None for anything that is not a letter."""
    if not unicodedata.category(char).startswith("L"):
        return None
    name = unicodedata.name(char, "")
    if name.startswith(("HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA")):
        return "japanese"
    if name.startswith("CJK"):
        return "han"
    if name.startswith("FULLWIDTH LATIN"):
        return "latin"
    return name.split(" ", 1)[0].lower() or None


def _scripts(text: str) -> Counter[str]:
    """Units of each script: a word of an alphabet counts once, as a CJK character does (a
    Japanese answer that names ``multiprocessing`` twice is still Japanese)."""
    return Counter(s for s in (script(u[0]) for u in units(text)) if s is not None)


def wrong_language(text: str, prompt: str) -> bool:
    """The answer is not mostly in the prompt's script, or brings in a script the prompt
    does not use. Japanese is kana and kanji together; Latin is allowed in any answer, HTML
    tags are not counted (``markup`` is their check)."""
    asked, answered = _scripts(prompt), _scripts(_HTML_TAG.sub(" ", text))
    if not asked or not answered:
        return False
    expected = asked.most_common(1)[0][0]
    # Kanji alone do not tell Japanese from Chinese: a kanji prompt may get kana back.
    family = {"japanese", "han"} if expected in ("japanese", "han") else {expected}
    share = sum(answered[s] for s in family) / sum(answered.values())
    allowed = set(asked) | family | {"latin"}
    foreign = sum(c for s, c in answered.items() if s not in allowed)
    if expected == "latin":
        return foreign >= LANGUAGE_FOREIGN
    return share < LANGUAGE_SHARE or foreign >= LANGUAGE_FOREIGN
