"""Guards: refuse a similar match, whatever its score, when the query asks something else.

Embeddings score opposite or near questions close together ("What is the capital of Japan?"
and "... of Korea?"; "Write a short poem" and "Write three short poems"), so a match must also
pass three checks against the known prompt and its labelled paraphrases:

- **numbers**: the query's numbers are those of the prompt or of one of its ``same:`` examples
  (3, three, 三つ and 3つ are one number; a labelled "What is Python used for?" shows that the
  prompt's "Answer in two sentences" may be left out). "One" (1, 一杯) counts only where the
  prompt counts something: "one cup of coffee" asks what "a cup of coffee" does, "in one
  sentence" not what "in two sentences" does;
- **negation**: the query negates exactly when the prompt does;
- **words**: every content word of the query occurs in the prompt or one of its ``same:``
  examples (a kanji or katakana run may be a concatenation of known runs). A new word (Korea,
  tea, mountains, 大阪, 紅茶) is a different question until someone labels it a paraphrase;
- **core words**: the words that three quarters of the prompt's paraphrases in the query's
  language share (Japan and capital; 日本 and 首都) are all in the query: "What is the
  capital?" asks less than "What is the capital of Japan?";
- **question form** (``Pool.decide``, against the nearest labelled paraphrase): a yes/no
  question ("Is breakfast good?", 東京は観光におすすめですか？) is not a question that asks
  what, how or where, unless a paraphrase in that form was labelled (お元気ですか？).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from comeapi.similar.text import Features, is_kanji_filler

MIN_PREFIX = 5  # "recommend" covers "recommendation"; "tour" does not cover "tourist"
CORE_SHARE = 0.9  # a word in this share of a language's paraphrases is a core word
MIN_CORE_TEXTS = 3  # fewer paraphrases in a language say nothing about its core words


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The content words of a known prompt and its ``same:`` examples, and the core words of
    its English and Japanese ones."""

    words: frozenset[str]
    core_en: frozenset[str] = frozenset()
    core_ja: frozenset[str] = frozenset()
    numbers: frozenset[tuple[int | str, ...]] = frozenset()  # of the prompt and each example

    @classmethod
    def of(cls, texts: Iterable[Features]) -> Vocabulary:
        texts = list(texts)
        return cls(
            frozenset(w for f in texts for w in f.words),
            _core([f for f in texts if not f.japanese]),
            _core([f for f in texts if f.japanese]),
            frozenset(f.numbers for f in texts),
        )

    def allows_numbers(self, query: Features, prompt: Features) -> bool:
        """Whether the query's numbers are the prompt's or a labelled paraphrase's."""
        counting = any(n != 1 for n in prompt.numbers)
        allowed = {_counted(n, counting) for n in (prompt.numbers, *self.numbers)}
        return _counted(query.numbers, counting) in allowed

    def missing(self, query: Features) -> list[str]:
        """The core words of the query's language that the query lacks."""
        core = self.core_ja if query.japanese else self.core_en
        return sorted(c[2:] for c in core if not _present(c, query.words))

    def covers(self, word: str) -> bool:
        if word in self.words:
            return True
        tag, value = word[:2], word[2:]
        if tag == "l:":
            return any(k.startswith("l:") and _inflected(value, k[2:]) for k in self.words)
        if tag in ("k:", "t:"):
            return self._concatenation(tag, value)
        return False

    def _concatenation(self, tag: str, run: str) -> bool:
        """True when ``run`` is known runs (or request fillers, for kanji) written together."""
        reachable = [True] + [False] * len(run)
        for end in range(1, len(run) + 1):
            for start in range(end):
                if reachable[start]:
                    piece = run[start:end]
                    if tag + piece in self.words or (tag == "k:" and is_kanji_filler(piece)):
                        reachable[end] = True
                        break
        return reachable[-1]


def _present(word: str, words: frozenset[str]) -> bool:
    """Is ``word`` in ``words``, inflected (Latin) or inside a longer run (朝 in 朝食)?"""
    if word in words:
        return True
    tag, value = word[:2], word[2:]
    for other in words:
        if not other.startswith(tag):
            continue
        if tag in ("k:", "t:") and value in other[2:]:
            return True
        if tag == "l:" and _inflected(value, other[2:]):
            return True
    return False


def _inflected(a: str, b: str) -> bool:
    """One English word the other with an ending the stemmer leaves (recommend, -ation)."""
    return min(len(a), len(b)) >= MIN_PREFIX and (a.startswith(b) or b.startswith(a))


def _counted(numbers: tuple[int | str, ...], counting: bool) -> tuple[int | str, ...]:
    """``numbers`` as the guard compares them: without 1 unless the prompt counts something."""
    return numbers if counting else tuple(n for n in numbers if n != 1)


def _core(texts: list[Features]) -> frozenset[str]:
    if len(texts) < MIN_CORE_TEXTS:
        return frozenset()
    candidates = {w for f in texts for w in f.words}
    need = CORE_SHARE * len(texts)
    return frozenset(c for c in candidates if sum(_present(c, f.words) for f in texts) >= need)


def refusal(query: Features, prompt: Features, vocabulary: Vocabulary) -> str | None:
    """Why ``query`` must not be answered as ``prompt`` whatever its score, or None."""
    if query.negated != prompt.negated:
        return "negation differs" if query.negated else "the prompt negates, the query does not"
    if not vocabulary.allows_numbers(query, prompt):
        return f"numbers differ ({_numbers(query)} vs {_numbers(prompt)})"
    if not query.words:
        return "no content words"
    new = sorted(w[2:] for w in query.words if not vocabulary.covers(w))
    if new:
        return "new words: " + ", ".join(new[:5])
    missing = vocabulary.missing(query)
    if missing:
        return "missing words: " + ", ".join(missing[:5])
    return None


def _numbers(f: Features) -> str:
    return ", ".join(map(str, f.numbers)) or "none"
