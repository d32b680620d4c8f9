"""uvicorn's private names that ``comeapi.http`` relies on, as listed in the docstring of
``comeapi.http.server``: each must still exist where the list says, take the keywords it is
called with, and have the attributes used on it. A uvicorn upgrade that moves one fails
here rather than in a running server."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
from typing import Any

import pytest
import uvicorn

import comeapi.http.server

ITEM = re.compile(r"(?P<name>\w+)(?:\((?P<keywords>[^)]*)\))?(?P<attrs>(?:\s+\.\w+)*)")


def listed() -> list[tuple[str, str, list[str] | None, list[str]]]:
    """(module, name, keywords or None, attributes) of each item of the docstring's list."""
    doc = comeapi.http.server.__doc__ or ""
    bullets = re.findall(r"^- (uvicorn[\w.]*): (.*?)(?=^- |\Z)", doc, re.M | re.S)
    out = []
    for module, text in bullets:
        for item in " ".join(text.split()).split(";"):
            match = ITEM.fullmatch(item.strip())
            assert match is not None, f"cannot read {item!r} in comeapi.http.server's list"
            keywords = match["keywords"]
            out.append(
                (
                    module,
                    match["name"],
                    [k.strip() for k in keywords.split(",")] if keywords is not None else None,
                    match["attrs"].split(),
                )
            )
    return out


def test_the_list_is_there_and_readable() -> None:
    names = {name for _, name, _, _ in listed()}
    assert {"RequestResponseCycle", "FlowControl", "ServerState", "STATUS_LINE"} <= names


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None


def instance(module: str, name: str, obj: Any) -> Any:
    """An instance to look for instance attributes on."""
    loop = asyncio.new_event_loop()
    try:
        transport: Any = object()
        if name == "RequestResponseCycle":
            from uvicorn.protocols.http.flow_control import FlowControl

            return obj(
                scope={},
                transport=transport,
                flow=FlowControl(transport),
                logger=None,
                access_logger=None,
                access_log=False,
                default_headers=[],
                message_event=asyncio.Event(),
                expect_100_continue=False,
                keep_alive=True,
                on_response=lambda: None,
            )
        if name == "FlowControl":
            return obj(transport)
        if name == "ProxyHeadersMiddleware":
            return obj(app=None, trusted_hosts="127.0.0.1")
        if name == "Config":
            config = obj(app=_app, http="h11", limit_concurrency=1, timeout_keep_alive=5)
            config.load()  # loaded_app exists once loaded
            return config
        return obj()
    finally:
        loop.close()


@pytest.mark.parametrize("item", listed(), ids=lambda item: f"{item[0]}:{item[1]}")
def test_each_name_is_where_it_was(item: tuple[str, str, list[str] | None, list[str]]) -> None:
    module, name, keywords, attrs = item
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"{module}:{name} is gone (uvicorn {uvicorn.__version__})"
    if keywords is not None:
        params = inspect.signature(obj).parameters
        missing = [k for k in keywords if k and k not in params]
        assert not missing, f"{module}:{name} no longer takes {missing}"
    if attrs:
        target = instance(module, name, obj) if keywords is not None else obj
        for attr in attrs:
            assert hasattr(target, attr[1:]), f"{module}:{name} has no {attr}"
