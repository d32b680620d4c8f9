"""The one error hierarchy of comeapi, and how each error looks on the wire.

Lower-level errors (httpx, sqlite3, botocore, llama.cpp) are translated into these at the
boundary where they happen (``raise StoreError(...) from exc``); the HTTP layer turns them
into OpenAI's error shape in one place (``comeapi.http.errors``).

    ComeapiError
    ├── ConfigError ............. bad settings, prompt set or model file (start-up)
    ├── RequestError ............ 400: the client's request is invalid
    │   ├── ContextLengthError .. 400: prompt + max_tokens do not fit the context
    │   └── AmbiguousPromptError  400: a prompt names several cached prompts (lists them)
    ├── AuthenticationError ..... 401: missing or wrong API key
    ├── NotFoundError ........... 404: unknown route
    │   ├── ModelNotFoundError .. 404: unknown model_name (lists the known models)
    │   ├── PromptNotCachedError  404: prompt not in the cache (lists the known prompts)
    │   └── AnswerNotFoundError . 404: no stored answer of that prompt and variant
    ├── ReviewConflictError ..... 409: a review change that contradicts the answer's state
    ├── PayloadTooLargeError .... 413: request body over the limit
    ├── UnavailableError ........ 503 + Retry-After: nothing can take the request now
    │   ├── QueueFullError ...... every backend busy and the wait queue is full
    │   └── QueueTimeoutError ... waited in the queue longer than the timeout
    ├── UpstreamError ........... 502: a backend failed after the answer started
    ├── StoreError .............. the response store failed (locked, read-only, corrupt)
    │   └── StoreUnavailableError  503 + Retry-After: store throttled or unreachable (DynamoDB)
    └── ArchiveError ............ an export archive is truncated, tampered or incompatible
"""

from __future__ import annotations

from typing import Any


class ComeapiError(Exception):
    """Base class. ``status``, ``type`` and ``code`` say how it looks over HTTP."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(ComeapiError):
    type = "configuration_error"


class RequestError(ComeapiError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class AmbiguousPromptError(RequestError):
    """A prompt text that names several cached prompts (another model, a prompt and a chat
    with the same last message): ``candidates`` lists them, to be named by key."""

    code = "ambiguous_prompt"

    def __init__(self, message: str, candidates: list[dict[str, Any]], *, param: str = "prompt"):
        super().__init__(message, param=param)
        self.candidates = candidates

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["error"]["candidates"] = self.candidates
        return body


class AuthenticationError(ComeapiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}  # RFC 6750: the scheme a client must use


class NotFoundError(ComeapiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]):
        listing = ", ".join(available) or "(none)"
        super().__init__(f"Model {model!r} not found. Available models: {listing}", param="model")
        self.available = available

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["error"]["available_models"] = self.available
        return body


class PromptNotCachedError(NotFoundError):
    code = "prompt_not_cached"

    def __init__(self, known_prompts: list[str]):
        super().__init__(
            "This prompt is not in the cache and no backend answers misses. "
            f"{len(known_prompts)} prompts are known (see known_prompts).",
            param="prompt",
        )
        self.known_prompts = known_prompts

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["error"]["known_prompts"] = self.known_prompts
        return body


class AnswerNotFoundError(NotFoundError):
    code = "answer_not_found"


class ReviewConflictError(ComeapiError):
    """Pinning a rejected answer, regenerating a pinned one: say what to do first."""

    status = 409
    type = "invalid_request_error"
    code = "review_conflict"


class PayloadTooLargeError(ComeapiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnavailableError(ComeapiError):
    status = 503
    type = "service_unavailable"
    code = "no_backend_available"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; never advertise 0 (clients would spin).
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class QueueFullError(UnavailableError):
    code = "queue_full"


class QueueTimeoutError(UnavailableError):
    code = "queue_timeout"


class UpstreamError(ComeapiError):
    status = 502
    type = "upstream_error"
    code = "backend_failed"


class StoreError(ComeapiError):
    type = "store_error"
    code = "store_failed"


class StoreUnavailableError(StoreError, UnavailableError):
    """A transient store failure (DynamoDB throttling, a 5xx, a timeout): retry later."""

    status = 503
    code = "store_unavailable"


class ArchiveError(ComeapiError):
    type = "archive_error"
    code = "bad_archive"
