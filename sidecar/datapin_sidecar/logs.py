"""Structured logs for the sidecar and node agent, on the standard library's `logging`.

Modules log as usual (`log = logging.getLogger(__name__)`, `log.info("...", extra={...})`);
`configure_logging` decides what a line looks like, once, in the program's entry point.

* **JSON lines** when the stream is not a terminal (a pod's stdout/stderr, collected by a log
  pipeline): one object per record, `{"ts", "level", "logger", "msg", ...fields}`. A record is
  always exactly one line: `json.dumps` escapes the newlines of messages and tracebacks, and a
  value it cannot encode is written as its `str()`, so a log call never fails or splits a line.
* **Text** on a terminal, for a person: `12:00:01.234 INFO datapin.cache: msg  key=value`.
  A traceback follows on its own lines there, because it is read, not parsed.

Fields come from three places, later ones winning on a clash: `static` fields given to
`configure_logging` (who is logging: `pod`, `node`, `mode`; left out of text lines on a
terminal, where they are the same on every line), the *context* set by `log_context` (what is
being worked on: `dataset`, `revision`), and the record's own `extra`. The core keys (`ts`,
`level`, `logger`, `msg`, and `error`/`traceback` when there is an exception) win over a field
of the same name, so no field can forge them.

The context lives in a `contextvars.ContextVar`: a `with log_context(dataset="x")` block covers
every line logged inside it, including in tasks it starts and in `asyncio.to_thread` calls
(both copy the context), while concurrent tasks each keep their own. It is read when a record
is formatted, which our handler does synchronously in the thread that logs.

Secrets are never passed to a logger: callers log which remote or which Secret volume, never a
key. As a safety net for a mistake, a field whose name contains `secret`, `password`, `token`
or `credential` is written as `[redacted]` whatever its value, and every formatted line,
traceback included, goes through `redaction.redact`, which masks any key value datapin has read
(a key pasted into the wrong file, or echoed back by an S3 server, is still a key).
`redacting_excepthook` does the same for a traceback nobody caught.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, TextIO

from datapin_sidecar.errors import UsageError
from datapin_sidecar.redaction import REDACTED, redact

#: The name of the handler `configure_logging` installs, so a second call replaces it.
_HANDLER_NAME: Final = "datapin"

_REDACT: Final = re.compile(r"secret|password|token|credential", re.IGNORECASE)

#: Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # Python 3.12+
}
_CORE: Final = ("ts", "level", "logger", "msg", "error", "traceback")

_EMPTY: Final[Mapping[str, str]] = {}
_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("datapin_log_context", default=_EMPTY)


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Attach `fields` to every line logged inside the block (nested blocks merge)."""
    # A new mapping each time: the outer one may still be in use by other tasks.
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> Mapping[str, str]:
    """The fields `log_context` blocks have set here (for error reports that want them)."""
    return _CONTEXT.get()


def configure_logging(
    *,
    fmt: Literal["auto", "json", "text"] = "auto",
    level: str = "INFO",
    stream: TextIO | None = None,
    static: Mapping[str, str] | None = None,
) -> None:
    """Send all logs to `stream` (default: stderr) as JSON lines or text, at `level`.

    Replaces the handler an earlier call installed, so calling it again never doubles lines.
    """
    if fmt not in ("auto", "json", "text"):
        raise UsageError(f"log format {fmt!r} is not one of auto, json, text")
    levels = logging.getLevelNamesMapping()
    number = levels.get(level.upper())
    if number is None:
        names = ", ".join(n.lower() for n in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
        raise UsageError(f"log level {level!r} is not one of {names}")
    out = stream if stream is not None else sys.stderr
    tty = _isatty(out)
    text = fmt == "text" or (fmt == "auto" and tty)
    fields = dict(static or {})
    formatter: logging.Formatter = (
        TextFormatter(static=fields if not tty else {}) if text else JsonFormatter(static=fields)
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        # Not old.close(): it would not close the stream, but it may be the same handler
        # object another thread is emitting through right now; dropping it is enough.
    root.addHandler(handler)
    root.setLevel(number)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _fields(record: logging.LogRecord, static: Mapping[str, str]) -> dict[str, Any]:
    """static, context and extras of `record`, later winning, with secrets redacted."""
    fields: dict[str, Any] = {**static, **_CONTEXT.get()}
    for name, value in record.__dict__.items():
        if name not in _STANDARD:
            fields[name] = value
    for name in fields:
        if _REDACT.search(name):
            fields[name] = REDACTED
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, *, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record, self._static)
        core: dict[str, Any] = {
            "ts": _rfc3339(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            core["error"] = _error(record.exc_info[1])
            core["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = record.stack_info
        line = {**core, **{k: v for k, v in fields.items() if k not in core}}
        try:
            return redact(json.dumps(line, default=str, allow_nan=False))
        except (TypeError, ValueError):
            # NaN, a circular structure, a dict with non-string keys: those values as text.
            safe = {k: v if _encodes(v) else str(v) for k, v in line.items()}
            return redact(json.dumps(safe, default=str))


class TextFormatter(logging.Formatter):
    """`HH:MM:SS.mmm LEVEL logger: msg  key=value ...` in local time, for a terminal."""

    def __init__(self, *, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{clock}.{int(record.msecs):03d} {record.levelname} {record.name}: "
        line += record.getMessage()
        fields = _fields(record, self._static)
        if fields:
            line += "  " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


def redacting_excepthook(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """`sys.excepthook` that prints the usual traceback with key values masked: a bug still
    shows where it happened, never a key that was in a message or a local."""
    text = "".join(traceback.format_exception(kind, exc, tb))
    sys.stderr.write(redact(text))


def _text_value(value: Any) -> str:
    text = str(value)
    # Quoted only when a reader could not tell where the value ends.
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _encodes(value: Any) -> bool:
    try:
        json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _rfc3339(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(int(record.created), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{int(record.msecs):03d}Z"


def _error(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
