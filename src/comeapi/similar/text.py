"""What the guards read in a text: content words, numbers and negation, English and Japanese.

No morphological analyser (a dictionary is tens of MB and a second of start-up): text is split
by script. Latin words are lower-cased and lightly stemmed; kanji and katakana runs are kept
whole (a run the vocabulary does not hold, whole or as a concatenation of known runs, is a new
word); hiragana runs, which are mostly particles and verb endings, are stripped of those at
both ends and kept only when three or more characters remain (おやつ, おすすめ), and question
words and negation are looked up in them. The guards (``guards.py``) compare these features.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass


def _words(text: str) -> list[str]:
    return text.split()


# Scripts, after NFKC (full-width Latin and digits, half-width katakana become plain).
_TOKEN = re.compile(
    r"(?P<num>\d+(?:[.,]\d+)*)"
    r"|(?P<latin>[a-z]+(?:'[a-z]+)*)"
    r"|(?P<kanji>[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff々〆ヵヶ]+)"
    r"|(?P<kata>[\u30a1-\u30faー]+)"
    r"|(?P<hira>[\u3041-\u3096ゝゞ]+)"
)

# Words that carry no content of their own in a question or an instruction: function words,
# greetings and the framing of a request. Question words, tense (was, did), quantities, the
# particles of phrasal verbs (turn on / off) and the first person (I, me: "What can I help you
# with?" is not "What can you help me with?") are left out on purpose: they change the answer.
_EN_STOP = frozenset(
    _words("""a an the this that these those some any your their his her its it you they them he she
    yourself is are am be been being do does have has will would can could should shall may
    might must of in at to for from with about by as into and or but so if then
    there here please kindly just really very quite also too now tell explain describe give
    show let know want need like get s re ve d ll m hi hello hey greetings share
    provide something anything everything everyone someone kind sort type way quick quickly
    briefly simply basically actually today""")
)
# A question that starts with an auxiliary asks yes or no ("Is breakfast good?", "Does it
# work?"), unless it is the polite form of a request ("Can you recommend ...?", "Do you know
# ...?", "Is there ...?") or asks a question word after all.
_YES_NO = re.compile(
    r"\W*(?:is|are|am|was|were|do|does|did|can|could|will|would|should|shall|may|might|must"
    r"|has|have|had|isn't|aren't|don't|doesn't|didn't|can't|won't)\b"
)
_REQUEST = re.compile(
    r"\W*(?:(?:can|could|would|will) you|do you (?:know|have)|is there|are there)\b"
)
# "Good afternoon" greets; it does not make "good" a word of the question.
_GREETING = re.compile(r"\bgood (?:morning|afternoon|evening|day|night)\b")
_PERFECT = re.compile(r"\b(?:have|has)\s+(?:been|done|[a-z]+ed)\b")
# Japanese asks yes or no with か after です, ます or でしょう and no question word; the same form
# after あります, もらえます, くれます, いただけます (or ませんか) is a request.
_JA_YES_NO = re.compile(r"(?:です|ます|でしょう)か\W*$")
_JA_REQUEST = re.compile(r"(?:(?:あり|もらえ|くれ|いただけ)ます|ません)か\W*$")
_JA_QUESTION_KANJI = re.compile(r"[何誰幾]")
_EN_QUESTION = frozenset(_words("what which how where when who whom whose why"))
_LATIN_WORD = re.compile(r"[a-z]+")
_JAPANESE = re.compile(r"[\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
_EN_NEGATION = frozenset(_words("not no never none nothing nobody neither nor without cannot"))
_EN_NUMBERS = {
    w: i
    for i, w in enumerate(
        _words(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen twenty"
        )
    )
}
_EN_NUMBERS.update(
    {"thirty": 30, "forty": 40, "fifty": 50, "hundred": 100, "thousand": 1000, "dozen": 12}
)
_EN_NUMBERS.update(
    {
        w: i
        for i, w in enumerate(
            _words("zeroth first second third fourth fifth sixth seventh eighth ninth tenth")
        )
        if i
    }
)
_EN_SUFFIXES = ("ations", "ation", "ings", "ing", "ed", "ies", "es", "s")

# Kanji words that only frame a request ("please explain", "the way to").
_KANJI_FILLER = frozenset(_words("教 説明 解説 方法 簡単 詳 願 少"))
_HIRA_FILLER = frozenset(_words("こんにち こんにちは やあ どうも"))  # greetings
# Question words that ask the same: "which city" is "what city".
_SAME_QUESTION = {"which": "what", "なん": "なに"}
_KANJI_DIGITS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_KANJI_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10000}
# A kanji numeral counts as a number only before a counter: 一番 ("most") is not one.
_KANJI_NUMBER = re.compile(
    r"([一二三四五六七八九十百千万]+)(?=つ|個|点|杯|人|日|年|月|回|本|枚|匹|冊|件|種|番目|位|行"
    r"|文|語|歳|才|時|分|秒|か所|箇所|ヶ所|章|曲|首|品|皿)"
)

_KANJI_NUMERAL = re.compile(r"[一二三四五六七八九十百千万]+")
_COUNTED = re.compile(_KANJI_NUMBER.pattern.replace("(?=", "(?:", 1))

_HIRA_QUESTION = ("どうして", "いくつ", "いくら", "いかが", "どちら", "どんな", "なぜ", "だれ",
                  "どこ", "いつ", "どう", "どの", "どれ", "なに", "なん")  # fmt: skip
_HIRA_NEGATION = re.compile(r"ない|なかっ|なく|ません|ずに|せず|ぬ")
# Negative forms that are polite requests, not negations: 教えてくれない？ ありませんか？
# (but 有名ではありませんか？ asks "is it not famous?")
_HIRA_POLITE = re.compile(
    r"(?:くれ|もらえ|いただけ)(?:ない|ません)|(?<!では)(?<!じゃ)ありませんか|ないですか|ないかな"
)
_HIRA_PREFIXES = sorted(
    _words(
        "の は が を に で と も へ や か って とは には では にも でも から まで より について "
        "における による として など なら ね よ な した して する"
    ),
    key=len,
    reverse=True,
)
_HIRA_SUFFIXES = sorted(
    _words(
        "ですか ますか でしょうか でしょう ましょう ください くださ ほしい です ます "
        "でした ました ません たい か ね よ の は が を に で と も へ や な て た だ "
        "い う る れ ら り く け し す せ ば から って とは こと もの よう ため たら "
        "れば べき する して します した できる でき いる てる ある あり いい よい "
        "くれ もらえ もらい いただけ ておく てお とく"
    ),
    key=len,
    reverse=True,
)


@dataclass(frozen=True, slots=True)
class Features:
    """The parts of a text the guards compare (``guards.py``)."""

    # content words, tagged by script: "l:capital", "k:首都", "t:コーヒー", and a Latin word
    # with the number after it, "n:python 2"
    words: frozenset[str]
    numbers: tuple[int | str, ...]  # sorted by their text; "a" is none, "one" and 一杯 are 1
    negated: bool
    japanese: bool = False  # written in Japanese (any kana or kanji)
    yes_no: bool = False  # a yes/no question: "Is coffee good?", 東京は観光におすすめですか？


def canonical(text: str) -> str:
    """NFKC, lower case, curly apostrophes straight: the form every feature is read from."""
    return unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")


def features(text: str) -> Features:
    text = _GREETING.sub(" ", canonical(text))
    words: set[str] = set()
    numbers: Counter[int | str] = Counter()
    negated = False
    for m in _KANJI_NUMBER.finditer(text):
        numbers[_kanji_value(m.group(1))] += 1
    text = _COUNTED.sub(" ", text)  # 一杯淹れる: the count is a number, 淹 the word
    if _PERFECT.search(text):  # "What could you have helped me with?" asks about the past
        words.add("l:have")
    named: tuple[str, int] | None = None  # the content word just before, and where it ends
    for m in _TOKEN.finditer(text):
        kind, value = m.lastgroup, m.group()
        if kind == "num":
            numbers[_number(value)] += 1
            if named is not None and not text[named[1] : m.start()].strip():
                # "Python 2", "Windows 10", "top 3": a name with its number is a word of its
                # own, so "What is Python 2 used for?" is not "... Answer in two sentences."
                words.add(f"n:{named[0]} {value}")
        elif kind == "latin":
            negates, added = _latin(value, words, numbers)
            negated |= negates
            if added is not None:
                named = (added, m.end())
                continue
        elif kind == "kanji":
            if not _KANJI_NUMERAL.fullmatch(value):  # 三 of 三つ is a number, not a word
                words.add("k:" + value)
        elif kind == "kata":
            words.add("t:" + value)
        else:
            negated |= _hiragana(value, words)
        named = None
    japanese = _JAPANESE.search(text) is not None
    if japanese:
        yes_no = (
            _JA_YES_NO.search(text) is not None
            and _JA_REQUEST.search(text) is None
            and _JA_QUESTION_KANJI.search(text) is None
            and not any(w[2:] in _HIRA_QUESTION for w in words if w.startswith("h:"))
        )
    else:
        yes_no = (
            _YES_NO.match(text) is not None
            and _REQUEST.match(text) is None
            and not _EN_QUESTION.intersection(_LATIN_WORD.findall(text))
        )
    return Features(
        frozenset(words), tuple(sorted(numbers.elements(), key=str)), negated, japanese, yes_no
    )


def _latin(word: str, words: set[str], numbers: Counter[int | str]) -> tuple[bool, str | None]:
    """Adds one Latin word: whether it negates, and the content word added (if one was)."""
    negated = word.endswith("n't") or word in _EN_NEGATION
    if word.endswith("n't"):
        word = {"won't": "will", "can't": "can", "shan't": "shall"}.get(word, word[:-3])
    elif "'" in word:
        word = word.split("'", 1)[0]  # what's, japan's, you're
    if word in _EN_NUMBERS:
        numbers[_EN_NUMBERS[word]] += 1
    elif not negated and word not in _EN_STOP:
        added = stem(_SAME_QUESTION.get(word, word))
        words.add("l:" + added)
        return False, added
    return negated, None


def stem(word: str) -> str:
    """A light English stem: cups/cup, brewing/brewed/brew, recommendations/recommend."""
    for suffix in _EN_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "ies":
                return word[:-3] + "y"
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _hiragana(run: str, words: set[str]) -> bool:
    """Adds a hiragana run's question words and content core; True when it negates."""
    negated = bool(_HIRA_NEGATION.search(_HIRA_POLITE.sub("", run)))
    for q in _HIRA_QUESTION:
        if q in run:
            words.add("h:" + _SAME_QUESTION.get(q, q))
            run = run.replace(q, "|")
    # の and を join nouns (おすすめのおやつ) and are hardly ever inside a word written in kana.
    for piece in re.split(r"[|のを]", run):
        core = _strip(piece)
        if len(core) >= 3 and core not in _HIRA_FILLER:
            words.add("h:" + core)
    return negated


def _strip(piece: str) -> str:
    changed = True
    while changed and piece:
        changed = False
        for p in _HIRA_PREFIXES:
            if piece.startswith(p) and len(piece) > len(p):
                piece, changed = piece[len(p) :], True
                break
        for s in _HIRA_SUFFIXES:
            if piece.endswith(s):
                piece, changed = piece[: -len(s)], True
                break
    return piece


def _number(text: str) -> int | str:
    digits = text.replace(",", "")
    return int(digits) if digits.isdigit() else digits


def _kanji_value(numeral: str) -> int:
    """一 1, 十 10, 二十五 25, 三百 300 (what a counter follows in a question)."""
    total, digit = 0, 0
    for ch in numeral:
        if ch in _KANJI_DIGITS:
            digit = _KANJI_DIGITS[ch]
        else:
            total += (digit or 1) * _KANJI_UNITS[ch]
            digit = 0
    return total + digit


def is_kanji_filler(run: str) -> bool:
    return run in _KANJI_FILLER
