"""What the inference engines can do with a request, and a clear 400 for what they cannot.

Every request field is honoured or refused by name, never silently ignored
(docs/backend.md lists each field).
"""

from __future__ import annotations

from comeapi.errors import RequestError
from comeapi.protocol.requests import GenerationRequest


def refuse_unsupported(request: GenerationRequest) -> None:
    """RequestError naming the first field this backend cannot honour."""
    for i, kind in request.media():
        what = {"image_url": "images", "input_audio": "audio", "file": "files"}.get(kind, kind)
        raise RequestError(
            f"messages.{i}.content: this model reads text only, it cannot take {what}",
            param=f"messages.{i}.content",
            code="unsupported_content",
        )
    checks = (
        ("prompt", len(request.prompts) > 1, "several prompts in one request"),
        ("n", request.n > 1, "more than one choice"),
        ("logprobs", request.logprobs, "log probabilities"),
        ("logit_bias", bool(request.logit_bias), "logit bias"),
        ("response_format", request.response_format is not None, "response formats"),
        ("echo", request.echo, "echo"),
        ("presence_penalty", request.presence_penalty != 0.0, "presence penalty"),
        ("frequency_penalty", request.frequency_penalty != 0.0, "frequency penalty"),
        ("tools", bool(request.tools) and request.tool_choice != "none", "tool calling"),
    )
    for param, asked, what in checks:
        if asked:
            raise RequestError(
                f"{param}: this backend does not support {what}",
                param=param,
                code="unsupported_parameter",
            )
