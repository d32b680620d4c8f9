"""What the inference engines cannot do with a request: a clear 400 naming the field.

Every OpenAI request field is honoured, accepted and ignored for a stated reason, or refused by
name, never silently ignored; docs/backend.md's table lists each one and
tests/backend/test_openai_params.py walks that table. ``tools`` depend on the model's chat
template and are refused by the engines (``comeapi.backend.decoding.prompt_texts``).
"""

from __future__ import annotations

from typing import Any

from comeapi.errors import RequestError
from comeapi.protocol.requests import GenerationRequest

# Fields the parse lets through (unknown fields are not its business) that ask for something
# these engines do not do, with what a client may send instead of null.
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": (("",), "inserting text (a suffix) is not supported"),
    "best_of": ((1,), "best_of above 1 is not supported; use n"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "this model does not reason"),
    "verbosity": ((), "verbosity is not supported"),
    "store": ((False,), "completions are not stored"),
}


def refuse_unsupported(request: GenerationRequest, body: dict[str, Any]) -> None:
    """RequestError naming the first field this backend cannot honour."""
    for i, kind in request.media():
        what = {"image_url": "images", "input_audio": "audio", "file": "files"}.get(kind, kind)
        raise RequestError(
            f"messages.{i}.content: this model reads text only, it cannot take {what}",
            param=f"messages.{i}.content",
            code="unsupported_content",
        )
    if request.kind == "generate":
        return
    for param, (allowed, why) in _REFUSED.items():
        value = body.get(param)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise RequestError(f"{param}: {why}", param=param, code="unsupported_parameter")
