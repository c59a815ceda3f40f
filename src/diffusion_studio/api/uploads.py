"""A model file uploaded as multipart/form-data, streamed to a temporary file in the data dir as it arrives: the
first bytes are checked as soon as they are there (a text file is refused after its first chunk, not after
gigabytes), and the size is bounded by `limits.max_model_upload_bytes` (model files are far larger than
`limits.max_body_bytes`, so BodyLimit leaves this route to it). Small fields (`name`, `kind`, `replace`) are kept
in memory, a few KB at most."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..engine.library import MODEL_SUFFIXES, check_model_start
from ..requests import RequestError
from ..service.outcomes import ErrorKind, JobError, StudioError

PREFIX_BYTES = 16  # what check_model_start looks at
MAX_FIELD_BYTES = 4096


@dataclass
class ModelUpload:
    path: Path | None = None  # the temporary file (None: no `file` part came)
    file_name: str = ""  # as the client named it
    fields: dict[str, str] = field(default_factory=dict)


def too_large(limit: int) -> StudioError:
    return StudioError(JobError(ErrorKind.too_large, f"the model file is larger than the studio's limit of {limit} "
                                                     "bytes (limits.max_model_upload_bytes)", "file"))


class _Receiver:
    """python-multipart callbacks: the `file` part to disk (checked early, bounded), other parts as small text."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.upload = ModelUpload()
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._part: str | None = None  # the current part's field name
        self._handle = None
        self._prefix = b""
        self._written = 0
        self._text = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._part, self._text = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part != "file":
            return
        if self.upload.path is not None:
            raise RequestError("file", "send one file per import")
        file_name = Path(options.get(b"filename", b"").decode("utf-8", "replace").replace("\\", "/")).name
        suffix = Path(file_name).suffix.lower()
        if suffix not in MODEL_SUFFIXES:  # refused before a byte of it is stored
            raise RequestError("file", f"'{file_name or '(no name)'}' is not a model file: send a .safetensors (or a "
                                       "weights-only .ckpt/.pt/.pth/.bin)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.upload.file_name = file_name
        self.upload.path = self.folder / f".upload-{secrets.token_hex(8)}{suffix}"
        self._handle = self.upload.path.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part != "file":
            self._text += chunk
            if len(self._text) > MAX_FIELD_BYTES:
                raise RequestError(self._part or "body", f"is longer than {MAX_FIELD_BYTES} bytes")
            return
        self._written += len(chunk)
        if self._written > self.max_bytes:
            raise too_large(self.max_bytes)
        if len(self._prefix) < PREFIX_BYTES:
            self._prefix += chunk[:PREFIX_BYTES - len(self._prefix)]
            if len(self._prefix) == PREFIX_BYTES:
                check_model_start(self._prefix, self.upload.file_name)
        self._handle.write(chunk)

    def _end(self) -> None:
        if self._part == "file":
            self._handle.close()
            self._handle = None
            if len(self._prefix) < PREFIX_BYTES:
                check_model_start(self._prefix, self.upload.file_name)
        elif self._part:
            self.upload.fields[self._part] = self._text.decode("utf-8", "replace")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


async def receive_model_upload(request: Request, folder: Path, max_bytes: int) -> ModelUpload:
    """Stream the multipart body into `folder`; on any refusal the partial file is removed."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + 64 * 1024:
        raise too_large(max_bytes)
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError("body", "is not a multipart form (no boundary): send the file as the multipart field "
                                   "'file', or JSON {\"path\": ...}")
    receiver = _Receiver(folder, max_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        receiver.close()
        _remove(receiver.upload)
        raise RequestError("body", f"is not a readable multipart form ({exc})") from None
    except BaseException:
        receiver.close()
        _remove(receiver.upload)
        raise
    if receiver.upload.path is None:
        raise RequestError("file", "is missing: send the model as the multipart field 'file', or JSON "
                                   "{\"path\": \"<a file on the server>\"}")
    return receiver.upload


def _remove(upload: ModelUpload) -> None:
    if upload.path is not None:
        upload.path.unlink(missing_ok=True)
