"""Turn every exception into a response in OpenAI's error shape, in one place."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from comeapi.errors import ComeapiError, NotFoundError, RequestError
from comeapi.http.responses import JSONResponse

log = logging.getLogger("comeapi.http")


def error_response(exc: ComeapiError) -> Response:
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers())


async def _comeapi_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ComeapiError)
    return error_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err: ComeapiError
    if exc.status_code == 404:
        err = NotFoundError(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        err = RequestError(f"method {request.method} not allowed on {request.url.path}")
        err.status = 405
    else:
        err = ComeapiError(str(exc.detail))
        err.status = exc.status_code
    return error_response(err)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(ComeapiError("internal server error"))


EXCEPTION_HANDLERS: dict[type[Exception] | int, ExceptionHandler] = {
    ComeapiError: _comeapi_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
