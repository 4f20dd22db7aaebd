"""Multipart text as the client sent it: bytes that are not UTF-8 are never re-read as Latin-1.

Starlette decodes a form field's value, a part's name and a file's name in the body's charset
(UTF-8 unless the Content-Type declares one) and, where that fails, silently as Latin-1: the bytes
``{"a":"\\xff"}`` became the text ``{"a":"ÿ"}`` and were stored as if the client had meant it. No
check on the decoded text can undo that: ``"ÿ"`` is also what the valid UTF-8 bytes C3 BF give, so
refusing text that "looks mis-decoded" would refuse honest Latin-1 letters sent as UTF-8.

So the routes that read a form (``Utf8FormRoute``) decode the bytes here instead: in the declared
charset, a byte that does not fit kept as a lone surrogate (``surrogateescape``, as Python keeps a
file name that is not UTF-8). app/core/usertext.py refuses such text wherever user text is checked,
naming the byte and its offset: 422 ``bad_metadata`` for the ``metadata`` part, ``bad_name`` for a
file name. A declared charset Python does not know is a 400 ``bad_multipart`` (app/api/limits.py),
never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser


def _decode(data: bytes | bytearray, charset: str) -> str:
    try:
        return bytes(data).decode(charset, errors="surrogateescape")
    except UnicodeDecodeError as exc:  # a charset whose bad bytes surrogateescape cannot keep
        raise MultiPartException(f"a part is not {charset} text: {exc.reason} at byte {exc.start}") from None


class Utf8MultiPartParser(MultiPartParser):
    """Starlette's parser, but text that does not decode keeps its bytes as lone surrogates."""

    def on_part_end(self) -> None:
        current = self._current_part
        if current.file is not None:
            super().on_part_end()
            return
        self.items.append((current.field_name, _decode(current.data, self._charset)))

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        current = self._current_part
        _, options = parse_options_header(current.content_disposition)
        current.field_name = _decode(options[b"name"], self._charset)  # present: super() checked
        if current.file is not None and b"filename" in options:
            current.file.filename = _decode(options[b"filename"], self._charset)


class Utf8FormRequest(Request):
    """A request whose multipart form is parsed by ``Utf8MultiPartParser``."""

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type = self.headers.get("content-type", "")
        if self._form is None and parse_options_header(content_type)[0] == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    self._form = await Utf8MultiPartParser(
                        self.headers,
                        stream,
                        max_files=max_files,
                        max_fields=max_fields,
                        max_part_size=max_part_size,
                    ).parse()
            except MultiPartException as exc:  # as Starlette answers a malformed body
                raise HTTPException(status_code=400, detail=exc.message) from None
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class Utf8FormRoute(APIRoute):
    """The route class of every router with a route that reads a form (a file upload)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def utf8_form_handler(request: Request) -> Response:
            return await handler(Utf8FormRequest(request.scope, request.receive))

        return utf8_form_handler
