"""Adding one labelled example to a prompt set file (``comeapi cache label``), as a person
would: one more line in the prompt's ``same:`` or ``not:`` list, the rest of the file (its
comments, order and quoting) untouched. The file is checked again after the edit and put
back as it was if the prompt set no longer loads (a paraphrase labelled for two prompts)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from comeapi.cache.key import normalise
from comeapi.cache.prompts import load_prompt_set
from comeapi.errors import ConfigError


def add_label(path: Path, query: str, prompt: str, which: str) -> str:
    """Add ``query`` to the ``which`` ("same" or "not") list of ``prompt`` (its text, or a
    chat's last user message) in the prompt set ``path``; returns that item's key."""
    prompt_set = load_prompt_set(path)
    wanted = normalise(prompt)
    matches = [i for i in prompt_set.items if i.prompt == wanted]
    if not matches:
        known = "; ".join(repr(i.prompt) for i in prompt_set.items)
        raise ConfigError(f"{path}: no prompt {prompt!r} (known: {known})", param="prompt")
    item = matches[0]
    text = normalise(query)
    if not text:
        raise ConfigError("the query is empty", param="query")
    if text in item.same or text in item.not_:
        raise ConfigError(f"{query!r} is already labelled for {prompt!r}", param="query")
    source = path.read_text(encoding="utf-8")
    edited = _insert(source, item.index, "same" if which == "same" else "not", text, path)
    _write(path, edited)
    try:
        load_prompt_set(path)
    except ConfigError:
        _write(path, source)
        raise
    return item.key


def _insert(source: str, index: int, field: str, text: str, path: Path) -> str:
    """``source`` with ``text`` appended to prompts[index].field (made when missing)."""
    root = yaml.compose(source)
    prompts = _value(root, "prompts") if root is not None else None
    if not isinstance(prompts, yaml.SequenceNode) or index >= len(prompts.value):
        raise ConfigError(f"{path}: prompts[{index}] not found", param="prompts")
    item = prompts.value[index]
    if not isinstance(item, yaml.MappingNode) or item.flow_style:
        raise ConfigError(f"{path}: prompts[{index}] is not a block mapping", param="prompts")
    lines = source.splitlines(keepends=True)
    value = json.dumps(text, ensure_ascii=False)  # a double-quoted YAML scalar
    existing = _value(item, field)
    if existing is None:
        column = item.value[0][0].start_mark.column
        new = f"{' ' * column}{field}:\n{' ' * (column + 2)}- {value}\n"
        at = _line_after(item, lines)
    else:
        if not isinstance(existing, yaml.SequenceNode) or existing.flow_style:
            raise ConfigError(
                f"{path}: prompts[{index}].{field} is not a block list: add the line by hand",
                param="prompts",
            )
        if existing.value:
            column = existing.value[0].start_mark.column - 2  # the "- " before the text
        else:
            column = item.value[0][0].start_mark.column + 2
        new = f"{' ' * column}- {value}\n"
        at = _line_after(existing, lines)
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    lines.insert(at, new)
    return "".join(lines)


def _value(node: yaml.Node, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found: yaml.Node = v
            return found
    return None


def _line_after(node: yaml.Node, lines: list[str]) -> int:
    """The index of the line after ``node``'s last line of content: its last scalar's end
    (a collection's own end mark lies at the next key, past blank and comment lines)."""
    while isinstance(node, yaml.SequenceNode | yaml.MappingNode) and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    end = node.end_mark
    line = end.line if end.column > 0 else end.line - 1
    return min(line, len(lines) - 1) + 1


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
