"""``comeapi cache label``'s edit of a prompt set file (``cli.labels``): one line more, the
rest untouched, a list made where missing, and the file put back when it no longer loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from comeapi.cache.prompts import load_prompt_set
from comeapi.cli.labels import add_label
from comeapi.errors import ConfigError

SET = """\
# a comment that stays
model: m.gguf
prompts:
  - prompt: "Once upon a time"   # a story
    same:
      - "Long ago"
    not:
      - "Once upon a crime"

  # the chat
  - messages:
      - {role: user, content: "What is the capital of Japan?"}
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "set.yaml"
    p.write_text(SET, encoding="utf-8")
    return p


def test_a_label_is_one_more_line_in_its_list(path: Path) -> None:
    key = add_label(path, "Many years ago", "Once upon a time", "same")
    assert path.read_text() == SET.replace(
        '      - "Long ago"\n', '      - "Long ago"\n      - "Many years ago"\n'
    )
    (story, _) = load_prompt_set(path).items
    assert story.key == key and story.same == ("Long ago", "Many years ago")


def test_a_missing_list_is_made_under_its_item(path: Path) -> None:
    add_label(path, "日本の首都は？", "What is the capital of Japan?", "same")
    add_label(path, "What is the capital of Peru?", "What is the capital of Japan?", "not")
    (_, chat) = load_prompt_set(path).items
    assert chat.same == ("日本の首都は？",) and chat.not_ == ("What is the capital of Peru?",)
    assert path.read_text().startswith(SET)  # appended after the last item, nothing else moved


def test_a_contradicting_label_leaves_the_file_as_it_was(path: Path) -> None:
    with pytest.raises(ConfigError):
        add_label(path, "Long ago", "What is the capital of Japan?", "same")
    assert path.read_text() == SET
    with pytest.raises(ConfigError, match="already labelled"):
        add_label(path, "Long ago", "Once upon a time", "not")
    with pytest.raises(ConfigError, match="no prompt"):
        add_label(path, "x", "Tell me a joke", "same")
    assert path.read_text() == SET


def test_cache_misses_asks_the_gateway_on_its_default_port() -> None:
    """`comeapi cache misses` without --url asked port 8000; the gateway listens on 9000."""
    from comeapi.cli.similar import misses
    from comeapi.settings import Settings

    (url,) = [p.default for p in misses.params if p.name == "url"]
    assert url == f"http://127.0.0.1:{Settings().port}"
