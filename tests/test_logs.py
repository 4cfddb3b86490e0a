"""Structured logging: `datapin_sidecar.logs`.

Every test configures logging onto its own StringIO and reads back what a log pipeline would:
JSON lines that parse one by one, carrying the static, context and extra fields, with
exceptions kept on one line and secret-looking fields redacted. The context must follow work
into tasks and `asyncio.to_thread`, because that is where the sidecar does its work.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from datapin_sidecar.errors import UsageError
from datapin_sidecar.logs import configure_logging, current_context, log_context

log = logging.getLogger("datapin.test")


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Each test configures the root logger; put back what pytest had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def json_stream(**static: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt="auto", stream=stream, static=static)
    return stream


def test_json_lines_carry_static_context_and_extras() -> None:
    stream = json_stream(pod="ml/train-0", node="n1", mode="run")
    with log_context(dataset="imagenet", revision="a" * 32 + ".dir"):
        log.info("fetched %d objects", 3, extra={"objects": 3, "seconds": 1.5})
    log.warning("outside")
    first, second = lines(stream)
    assert first == {
        "ts": first["ts"],
        "level": "info",
        "logger": "datapin.test",
        "msg": "fetched 3 objects",
        "pod": "ml/train-0",
        "node": "n1",
        "mode": "run",
        "dataset": "imagenet",
        "revision": "a" * 32 + ".dir",
        "objects": 3,
        "seconds": 1.5,
    }
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert second["level"] == "warning"
    assert "dataset" not in second
    assert second["pod"] == "ml/train-0"


def test_timestamp_is_rfc3339_utc_with_milliseconds() -> None:
    stream = json_stream()
    before = datetime.now(UTC)
    log.info("now")
    (line,) = lines(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    stamp = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


def test_later_fields_win_but_never_over_core_keys() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream, static={"dataset": "static", "ts": "forged"})
    with log_context(dataset="context", level="forged"):
        log.info("m", extra={"logger": "forged", "revision": "extra"})
        with log_context(dataset="inner"):
            log.info("m", extra={"dataset": "extra"})
    first, second = lines(stream)
    assert first["dataset"] == "context"
    assert first["revision"] == "extra"
    assert (first["ts"], first["level"], first["logger"]) != ("forged", "forged", "forged")
    assert first["level"] == "info"
    assert first["logger"] == "datapin.test"
    assert second["dataset"] == "extra"


def test_context_nests_merges_and_unwinds() -> None:
    assert current_context() == {}
    with log_context(dataset="a"):
        with log_context(revision="r", dataset="b"):
            assert current_context() == {"dataset": "b", "revision": "r"}
        assert current_context() == {"dataset": "a"}
    assert current_context() == {}


async def test_context_follows_tasks_and_to_thread() -> None:
    stream = json_stream()

    def in_thread() -> None:
        log.info("thread")

    async def worker(name: str) -> None:
        with log_context(dataset=name):
            await asyncio.sleep(0)  # interleave with the other worker
            log.info("task")
            await asyncio.to_thread(in_thread)

    with log_context(pod="p"):
        await asyncio.gather(worker("a"), worker("b"))
        task = asyncio.create_task(asyncio.to_thread(in_thread))
    await task
    log.info("after")
    got = [(line["msg"], line.get("dataset"), line.get("pod")) for line in lines(stream)]
    assert sorted(got[:4]) == [
        ("task", "a", "p"),
        ("task", "b", "p"),
        ("thread", "a", "p"),
        ("thread", "b", "p"),
    ]
    # The task was created inside the block: it keeps the context after the block ends.
    assert got[4:] == [("thread", None, "p"), ("after", None, None)]


def test_tty_gives_text_without_static_fields() -> None:
    stream = TtyStream()
    configure_logging(stream=stream, static={"pod": "ml/train-0"})
    with log_context(dataset="imagenet"):
        log.info("hello %s", "world", extra={"path": "/data/a b", "empty": ""})
    line = stream.getvalue()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} INFO datapin\.test: hello world  "
        r'dataset=imagenet path="/data/a b" empty=""\n',
        line,
    ), line
    assert "ml/train-0" not in line


def test_text_on_a_pipe_keeps_static_fields() -> None:
    stream = io.StringIO()
    configure_logging(fmt="text", stream=stream, static={"pod": "ml/train-0"})
    log.error("boom")
    assert re.fullmatch(r"\S+ ERROR datapin\.test: boom  pod=ml/train-0\n", stream.getvalue())


def test_json_is_forced_even_on_a_tty() -> None:
    stream = TtyStream()
    configure_logging(fmt="json", stream=stream)
    log.info("x")
    assert lines(stream)[0]["msg"] == "x"


def test_exception_is_one_line_with_error_and_traceback() -> None:
    stream = json_stream()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("failed\nbadly", extra={"error": "forged"})
    text = stream.getvalue()
    assert text.count("\n") == 1
    (line,) = lines(stream)
    assert line["level"] == "error"
    assert line["msg"] == "failed\nbadly"
    assert line["error"] == "ValueError: bad\nthing"
    assert line["traceback"].startswith("Traceback (most recent call last):")
    assert "raise ValueError" in line["traceback"]


def test_exception_without_message_and_stack_info() -> None:
    stream = json_stream()
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        log.warning("stopped", exc_info=True, stack_info=True)
    (line,) = lines(stream)
    assert line["error"] == "KeyboardInterrupt"
    assert "Stack (most recent call last)" in line["stack"]


def test_exception_in_text_follows_the_line() -> None:
    stream = TtyStream()
    configure_logging(stream=stream)
    try:
        raise OSError("disk")
    except OSError:
        log.exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR datapin.test: failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "OSError: disk"


def test_values_json_cannot_encode_are_written_as_text() -> None:
    class Thing:
        def __str__(self) -> str:
            return "<thing>"

    circular: list[Any] = []
    circular.append(circular)
    stream = json_stream()
    log.info("a", extra={"thing": Thing(), "n": 2})
    log.info("b", extra={"nan": float("nan"), "loop": circular, "n": 2, "thing": Thing()})
    log.info("c", extra={"map": {("t",): 1}})
    a, b, c = lines(stream)
    assert a["thing"] == "<thing>"
    assert a["n"] == 2
    assert b["nan"] == "nan"
    assert b["loop"] == "[[...]]"
    assert (b["n"], b["thing"]) == (2, "<thing>")
    assert c["map"] == "{('t',): 1}"


@pytest.mark.parametrize(
    "name", ["secret_access_key", "password", "session_token", "AWS_SECRET", "Credentials"]
)
def test_secret_looking_fields_are_redacted(name: str) -> None:
    stream = json_stream(**{name: "S3CR3T-static"})
    with log_context(**{name: "S3CR3T-context"}):
        log.info("m", extra={name: "S3CR3T-extra", "keys": 3, "key_id": "visible"})
    tty = TtyStream()
    configure_logging(stream=tty)
    with log_context(**{name: "S3CR3T-context"}):
        log.info("m", extra={name: "S3CR3T-extra"})
    assert "S3CR3T" not in stream.getvalue() + tty.getvalue()
    (line,) = lines(stream)
    assert line[name] == "[redacted]"
    assert (line["keys"], line["key_id"]) == (3, "visible")
    assert f"{name}=[redacted]" in tty.getvalue()


def test_reconfiguring_replaces_the_handler() -> None:
    first = io.StringIO()
    configure_logging(stream=first)
    configure_logging(stream=first)
    second = io.StringIO()
    configure_logging(stream=second, static={"mode": "once"})
    log.info("once")
    assert first.getvalue() == ""
    assert [line["msg"] for line in lines(second)] == ["once"]
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "datapin"]
    assert len(ours) == 1


def test_level_filters_and_is_validated() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream, level="warning")
    log.info("hidden")
    log.warning("shown")
    configure_logging(fmt="json", stream=stream, level="debug")
    log.debug("debug")
    assert [line["msg"] for line in lines(stream)] == ["shown", "debug"]
    with pytest.raises(UsageError, match="log level 'loud'"):
        configure_logging(level="loud")
    with pytest.raises(UsageError, match="log format 'xml'"):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    log.info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["msg"] == "to stderr"
