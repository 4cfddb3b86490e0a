"""Which revision of which dataset a pod gets: the `datapin.dev/pins` annotation, both sides.

This module owns the format: the webhook writes it (`PinRecord`, `format_pins`, and
`read_pin_records` for pins already on an object), the sidecar reads it (`read_pins`,
`parse_pins`), so what is written is by construction what is read. It also owns the rule for
dataset names (`is_dataset_name`), which name the pins.

The datapin webhook writes the pins into the pod's annotations; the sidecar reads them from a
downward-API volume of `metadata.annotations`, not from the API server, so it needs no
credentials, no RBAC and no network to learn what to serve, and it sees a change as soon as
kubelet does.

**The file.** kubelet writes one line per annotation, keys sorted, each made by Go's
`fmt.Sprintf("%v=%q\\n", key, value)` with the final newline trimmed (`fieldpath.FormatMap`).
`%q` is `strconv.Quote`, so a value is a Go string literal: `\\"` and `\\\\`, the named escapes
`\\a \\b \\f \\n \\r \\t \\v`, `\\xNN` for other ASCII controls, `\\uNNNN`/`\\UNNNNNNNN` for other
runes Go does not consider printable, and printable non-ASCII runes as literal UTF-8. We parse
every escape Go's `strconv.Unquote` accepts (octal `\\NNN` and `\\xNN` bytes too, which may
spell multi-byte UTF-8), not only the ones `Quote` emits, and refuse everything it refuses,
so a file we accept is exactly a file Go would accept. Keys are taken as written: annotation
keys cannot contain `=` or `"`, but `parse_downward_annotations` does not rely on it (see
`_split_line`), so `format_downward_annotations` round-trips any key without a newline.

**Whole-file reads.** kubelet publishes a new file by renaming a `..data` symlink over the old
one and deleting the old directory. `read_pins` therefore opens the path once and reads it to
the end: a concurrent swap gives the old file or the new one, never a mix. A watcher must
re-open the path on every check (a kept file descriptor keeps reading the deleted old file).

**Errors.** A malformed file, a missing annotation or a bad pin is an `AnnotationsError` that
names the file, the line or dataset, what is wrong and the fix, because it ends up in the
sidecar's termination message (`kubectl describe pod`). Values are not secret, but some are
huge (`kubectl.kubernetes.io/last-applied-configuration` holds the whole pod spec), so an
error quotes at most the first 60 characters of one.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, cast

from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import (
    SNIPPET_CHARS,
    AnnotationsError,
    RevisionError,
    UnsafeFileError,
    UsageError,
)
from datapin_sidecar.errors import snippet as _snippet
from datapin_sidecar.safefs import read_regular

#: The annotation the webhook writes: a JSON object of dataset name -> pin.
ANNOTATION: Final = "datapin.dev/pins"
#: Written beside it when a revision was a git ref: JSON `{"<dataset>": "<git sha>"}`, for
#: humans reading `kubectl get -o yaml` (the sidecar does not read it).
COMMITS_ANNOTATION: Final = "datapin.dev/commits"

#: Kubernetes caps a pod's annotations at 256 KiB; the file adds quoting to that.
MAX_ANNOTATIONS_FILE: Final = 1024 * 1024

_FILE_FIX: Final = (
    "the file must be a downward-API volume of metadata.annotations (an item with "
    "`fieldRef: {fieldPath: metadata.annotations}`), written by kubelet and not edited"
)
_PINS_FIX: Final = (
    f"the datapin webhook writes {ANNOTATION}; if you set it by hand, make it a JSON object "
    'of dataset name -> "<md5>.dir" or {"pin": "<md5>.dir", "layout": "dvc3"|"legacy"|"auto", '
    '"ref": "<tag>", "paths": ["<folder>", ...]}'
)

# A Go double-quoted string literal as `strconv.Unquote` accepts it. Possessive quantifiers:
# a value can be hundreds of KiB, and a failed match must not backtrack through it.
_ESCAPE_BODY: Final = r'[abfnrtv\\"]|x[0-9A-Fa-f]{2}|[0-7]{3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}'
_QUOTED: Final = re.compile(rf'"((?:[^"\\\n]++|\\(?:{_ESCAPE_BODY}))*+)"')
_UNQUOTED_PREFIX: Final = re.compile(rf'(?:[^"\\\n]++|\\(?:{_ESCAPE_BODY}))*+')
_ESCAPE: Final = re.compile(
    r'\\(?:([abfnrtv\\"])|x([0-9A-Fa-f]{2})|([0-7]{3})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8}))'
)
_NAMED: Final = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}
_NAMED_OUT: Final = {chr(v): "\\" + k for k, v in _NAMED.items()}
# Everything but printable ASCII other than `"` and `\`: the only characters `Quote` may change.
_MAYBE_ESCAPED: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")

# --- dataset names: the one rule ------------------------------------------------------------
#: A dataset's name is its Dataset object's name, a directory name on the node and a metric
#: label: a DNS-1123 subdomain (dot-separated labels of lower-case letters, digits and '-',
#: each starting and ending with a letter or digit), as Kubernetes requires of object names.
_DATASET_NAME: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
#: The longest object name Kubernetes admits: the limit wherever a name only names a Dataset
#: (the pins, the sidecar's and agent's settings).
DATASET_NAME_MAX: Final = 253
#: The longest name a Job may ask for: the per-dataset annotations put the name into an
#: annotation key's name part (`datapin.dev/mount-path.<dataset>`), which Kubernetes caps at
#: 63 characters, and the longest prefix, `mount-path.`, takes 11 of them.
KEYED_DATASET_NAME_MAX: Final = 63 - len("mount-path.")
_PIN_KEYS: Final = frozenset({"pin", "layout", "ref", "paths"})
#: What the webhook writes as a pin: a directory id as DVC writes it (lower case).
_PIN: Final = re.compile(r"[0-9a-f]{32}\.dir")
_LAYOUTS: Final = tuple(choice.value for choice in LayoutChoice)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pin:
    """The revision of one dataset a pod is pinned to."""

    dataset: str
    revision: Revision
    #: The layout the revision's objects were pushed in; None: find out (dvc3, then legacy).
    layout: Layout | None = None
    #: What the user asked for (`v1`, a branch, or the md5 itself): for display and metric
    #: labels only. The revision is what is served.
    ref: str
    #: The folders of the revision to serve (`engine.part`); `Part.WHOLE`: all of it.
    part: Part = Part.WHOLE


# --- the downward-API file ---------------------------------------------------------------


def parse_downward_annotations(text: str, *, source: str) -> dict[str, str]:
    """The annotations in a downward-API `metadata.annotations` file, as kubelet wrote them."""
    # kubelet trims the last newline; a file written by other means may keep it.
    body = text.removesuffix("\n")
    lines = body.split("\n") if body else []
    result: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        key, value = _parse_line(line, number=number, source=source)
        if key in result:
            _file_error(source, number, f"duplicate key {_snippet(key)}")
        result[key] = value
    return result


def format_downward_annotations(annotations: Mapping[str, str]) -> str:
    """`annotations` exactly as kubelet writes the file: sorted `key="value"` lines.

    Python's code-point order is Go's byte order for valid UTF-8, so the sort matches.
    Raises ValueError for a lone surrogate, which no Go string (and no UTF-8 file) can hold.
    """
    return "\n".join(f"{key}={go_quote(annotations[key])}" for key in sorted(annotations))


def go_quote(value: str) -> str:
    """`value` as Go's `strconv.Quote` writes it.

    Printability is Python's `unicodedata` (letters, marks, numbers, punctuation, symbols and
    the ASCII space, Go's `unicode.IsPrint`); for runes assigned in a newer Unicode than
    Python's, Go may print literally what this escapes. Both parse back the same.
    """
    return '"' + _MAYBE_ESCAPED.sub(_quote_char, value) + '"'


def _quote_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_OUT.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    category = unicodedata.category(char)
    if category == "Cs":
        raise ValueError(f"lone surrogate U+{code:04X} cannot be written as UTF-8")
    if category[0] in "LMNPS":
        return char
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _parse_line(line: str, *, number: int, source: str) -> tuple[str, str]:
    split = _split_line(line)
    if split is None:
        _file_error(source, number, _line_problem(line))
    key, body = split
    if not key:
        _file_error(source, number, f"empty key in {_snippet(line)}")
    try:
        return key, _unescape(body)
    except ValueError as exc:
        _file_error(source, number, f"value of {_snippet(key)}: {exc}")


def _split_line(line: str) -> tuple[str, str] | None:
    """`line` as (key, quoted body), or None if it is not `key="value"`.

    The key is what precedes the first `="` after which the rest of the line is one Go string
    literal. There is at most one such place: a later `="` would put an unescaped `"` inside
    the earlier literal. Each failed try stops at the next unescaped `"`, which is no later
    than the next candidate, so a line is scanned about once however many `="` it holds.
    """
    start = line.find('="')
    while start >= 0:
        match = _QUOTED.fullmatch(line, start + 1)
        if match is not None:
            return line[:start], match.group(1)
        start = line.find('="', start + 1)
    return None


def _line_problem(line: str) -> str:
    """What is wrong with a line that `_split_line` refused (diagnosed at its first `=`)."""
    if not line:
        return "empty line"
    key, sep, rest = line.partition("=")
    if not sep:
        return f"not key=\"value\" (no '='): {_snippet(line)}"
    if not rest.startswith('"'):
        return f"the value of {_snippet(key)} is not a double-quoted string: {_snippet(rest)}"
    stop = _UNQUOTED_PREFIX.match(rest, 1)
    end = stop.end() if stop is not None else 1
    column = len(key) + 2 + end
    if end == len(rest):
        return f"the value of {_snippet(key)} has no closing '\"'"
    if rest[end] == "\\":
        return (
            f"invalid escape {rest[end : end + 2]!r} at column {column} in the value of "
            f"{_snippet(key)}"
        )
    return (
        f"text after the closing '\"' at column {column} in the value of {_snippet(key)} (an "
        f"unescaped '\"' inside it?): {_snippet(rest[end + 1 :])}"
    )


def _unescape(body: str) -> str:
    """The value a Go string literal's body spells (raises ValueError as Unquote errors)."""
    if "\\" not in body:
        return body
    # `\xNN` and octal escapes are bytes, not runes, and may spell UTF-8 together, so the
    # value is assembled as bytes. surrogatepass: a stray surrogate then fails the decode.
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(body):
        out += body[pos : match.start()].encode("utf-8", "surrogatepass")
        pos = match.end()
        named, hex_byte, octal, short, long = match.groups()
        if named is not None:
            out.append(_NAMED[named])
        elif hex_byte is not None:
            out.append(int(hex_byte, 16))
        elif octal is not None:
            code = int(octal, 8)
            if code > 0xFF:
                raise ValueError(f"octal escape {match.group()!r} is above \\377")
            out.append(code)
        else:
            code = int(short or long, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError(f"escape {match.group()!r} is not a valid Unicode code point")
            out += chr(code).encode()
    out += body[pos:].encode("utf-8", "surrogatepass")
    try:
        return out.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 after unescaping ({exc.reason})") from None


def _file_error(source: str, line: int, problem: str) -> NoReturn:
    raise AnnotationsError(source=source, line=line, problem=problem, fix=_FILE_FIX)


# --- pins ----------------------------------------------------------------------------------


def is_dataset_name(name: str, *, limit: int = DATASET_NAME_MAX) -> bool:
    """Whether `name` is a usable dataset name of at most `limit` characters."""
    return len(name) <= limit and _DATASET_NAME.fullmatch(name) is not None


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a pin set twice is a mistake to report.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def parse_pins(annotations: Mapping[str, str], *, source: str) -> dict[str, Pin]:
    """The pins in a pod's annotations, by dataset name (in the annotation's order)."""
    where = f"annotation {ANNOTATION} in {source}"
    text = annotations.get(ANNOTATION)
    if text is None:
        raise AnnotationsError(
            source=source,
            problem=(
                f"no {ANNOTATION} annotation: the pod was not admitted by the datapin webhook, "
                "or the annotation was removed"
            ),
            fix=(
                "check that the datapin webhook is installed and selects this pod, recreate the "
                f"pod, and do not remove {ANNOTATION}"
            ),
        )
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        _pins_error(where, f"duplicate key {_snippet(exc.key)}")
    except json.JSONDecodeError as exc:
        _pins_error(where, f"not valid JSON ({exc.msg} at char {exc.pos}): {_snippet(text)}")
    if not isinstance(doc, dict):
        _pins_error(where, f"not a JSON object: {_snippet(text)}")
    if not doc:
        _pins_error(where, "no datasets (an empty object)")
    return {name: _pin(where, name, value) for name, value in doc.items()}


def _pin(where: str, name: str, value: Any) -> Pin:
    if not is_dataset_name(name):
        _pins_error(
            where,
            "not a valid dataset name (lower-case letters, digits, '-' and '.', starting and "
            f"ending with a letter or digit, at most {DATASET_NAME_MAX} characters)",
            dataset=name,
        )
    if isinstance(value, str):
        return Pin(dataset=name, revision=_revision(where, name, value), ref=value)
    if not isinstance(value, dict):
        _pins_error(
            where,
            f'the pin must be a string "<md5>.dir" or an object, not {_json_snippet(value)}',
            dataset=name,
        )
    unknown = sorted(set(value) - _PIN_KEYS)
    if unknown:
        _pins_error(
            where,
            f"unknown key(s) {', '.join(map(_snippet, unknown))} "
            f"(allowed: {', '.join(sorted(_PIN_KEYS))})",
            dataset=name,
        )
    pin = value.get("pin")
    if not isinstance(pin, str):
        _pins_error(where, 'no "pin": "<md5>.dir" string', dataset=name)
    layout = value.get("layout", LayoutChoice.AUTO.value)
    if not isinstance(layout, str) or layout not in _LAYOUTS:
        _pins_error(
            where,
            f"layout {_json_snippet(layout)} is not one of {', '.join(_LAYOUTS)}",
            dataset=name,
        )
    ref = value.get("ref", pin)
    if not isinstance(ref, str) or not ref:
        _pins_error(where, f"ref {_json_snippet(ref)} is not a non-empty string", dataset=name)
    revision = _revision(where, name, pin)
    try:
        part = Part.from_list(value.get("paths"), what="paths")
    except UsageError as exc:
        _pins_error(where, str(exc), dataset=name)
    if not part.whole and not revision.is_dir:
        _pins_error(where, "paths are folders of a directory revision (<md5>.dir)", dataset=name)
    return Pin(
        dataset=name,
        revision=revision,
        layout=LayoutChoice(layout).pinned,
        ref=ref,
        part=part,
    )


def _revision(where: str, name: str, text: str) -> Revision:
    fix = (
        "pin the dataset to a directory revision, `<32 hex>.dir` (the `md5:` of its .dvc file "
        f"or dvc.lock out); {_PINS_FIX}"
    )
    try:
        revision = Revision.parse(text)
    except RevisionError:
        _pins_error(where, f"pin {_snippet(text)} is not a DVC object id", dataset=name, fix=fix)
    if not revision.is_dir:
        # A single-file revision would need a file name, which a pin has no place for.
        _pins_error(
            where,
            f"pin {_snippet(text)} names a single file, not a directory",
            dataset=name,
            fix=fix,
        )
    return revision


def _pins_error(
    where: str, problem: str, *, dataset: str | None = None, fix: str = _PINS_FIX
) -> NoReturn:
    raise AnnotationsError(
        source=where, problem=problem, fix=fix, dataset=dataset, annotation=ANNOTATION
    )


# --- writing pins (the webhook) and reading them back --------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PinRecord:
    """How one dataset's revision resolved: what the webhook writes into `datapin.dev/pins`."""

    dataset: str
    pin: str
    ref: str
    layout: LayoutChoice
    commit: str | None = None
    #: The folders of the revision the pod gets (`engine.part`); `Part.WHOLE`: all of it.
    part: Part = Part.WHOLE


def format_pins(records: Sequence[PinRecord]) -> dict[str, str]:
    """The annotations that pin `records`: `datapin.dev/pins`, and `datapin.dev/commits` if
    any record has a commit. Compact JSON with sorted keys, so equal pins give equal bytes
    (idempotent patches, stable pod template hashes).

    Raises ValueError for records no sidecar would accept: these come from our own resolution,
    so a bad one is a bug, not a user error.
    """
    if not records:
        raise ValueError("format_pins needs at least one record")
    pins: dict[str, dict[str, str | list[str]]] = {}
    commits: dict[str, str] = {}
    for record in records:
        if record.dataset in pins:
            raise ValueError(f"dataset {record.dataset!r} is pinned twice")
        if not _PIN.fullmatch(record.pin) or not record.ref:
            raise ValueError(f"dataset {record.dataset!r}: bad pin {record.pin!r} or empty ref")
        pins[record.dataset] = {"layout": record.layout, "pin": record.pin, "ref": record.ref}
        if not record.part.whole:
            pins[record.dataset]["paths"] = record.part.to_list()
        if record.commit is not None:
            commits[record.dataset] = record.commit
    result = {ANNOTATION: _compact(pins)}
    if commits:
        result[COMMITS_ANNOTATION] = _compact(commits)
    return result


def read_pin_records(annotations: Mapping[str, str], *, source: str) -> dict[str, PinRecord] | None:
    """The pins (and commits) in `annotations` by dataset, None if there are none.

    The pins are read by `parse_pins`, so the webhook accepts exactly what the sidecar would
    serve. Raises `AnnotationsError` (with `annotation` set) for a malformed value of either key.
    """
    if ANNOTATION not in annotations:
        return None
    pins = parse_pins(annotations, source=source)
    commits = _commits(annotations.get(COMMITS_ANNOTATION), set(pins), source=source)
    return {
        name: PinRecord(
            dataset=name,
            pin=str(pin.revision),
            ref=pin.ref,
            layout=LayoutChoice.of(pin.layout),
            commit=commits.get(name),
            part=pin.part,
        )
        for name, pin in pins.items()
    }


def _commits(text: str | None, datasets: set[str], *, source: str) -> dict[str, str]:
    if text is None:
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        _commits_error(source, f"not valid JSON ({exc.msg} at char {exc.pos})")
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        _commits_error(source, "not a JSON object of dataset name to commit string")
    unknown = sorted(set(doc) - datasets)
    if unknown:
        _commits_error(source, f"names dataset(s) {', '.join(unknown)} that have no pin")
    return cast(dict[str, str], doc)


def _commits_error(source: str, problem: str) -> NoReturn:
    raise AnnotationsError(
        source=f"annotation {COMMITS_ANNOTATION} in {source}",
        problem=problem,
        fix=f"the datapin webhook writes {COMMITS_ANNOTATION} with {ANNOTATION}: remove both",
        annotation=COMMITS_ANNOTATION,
    )


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- the file on disk ------------------------------------------------------------------------


def read_pins(path: Path) -> dict[str, Pin]:
    """The pins in the downward-API annotations file at `path` (read once, whole).

    The file is kubelet's symlink through `..data`, resolved first; what it names must be a
    regular file of at most `MAX_ANNOTATIONS_FILE` bytes (never a FIFO or a device, which would
    block the watch loop or never end).
    """
    try:
        raw = read_regular(os.path.realpath(path), limit=MAX_ANNOTATIONS_FILE)
    except FileNotFoundError:
        raise AnnotationsError(
            source=str(path),
            problem="the annotations file does not exist",
            fix=(
                "mount a downward-API volume of metadata.annotations there (an item with "
                "`fieldRef: {fieldPath: metadata.annotations}`); the datapin webhook adds it "
                "when it injects the sidecar"
            ),
        ) from None
    except UnsafeFileError as exc:
        too_big = exc.problem.startswith("is larger")
        raise AnnotationsError(
            source=str(path),
            problem=f"is larger than {MAX_ANNOTATIONS_FILE} bytes"
            if too_big
            else "is a directory, not the annotations file"
            if os.path.isdir(path)
            else "is not a regular file (a FIFO or device)",
            fix="pass the file inside the downward-API volume (the item's `path`)",
        ) from None
    except OSError as exc:
        raise AnnotationsError(
            source=str(path),
            problem=f"cannot be read ({exc.strerror})",
            fix="mount the downward-API volume readable by the sidecar",
        ) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        _file_error(
            str(path), raw.count(b"\n", 0, exc.start) + 1, f"not valid UTF-8 ({exc.reason})"
        )
    return parse_pins(parse_downward_annotations(text, source=str(path)), source=str(path))


def _json_snippet(value: Any) -> str:
    """A JSON value as JSON for a message, cut to its first characters if it is long."""
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= SNIPPET_CHARS:
        return text
    return f"{text[:SNIPPET_CHARS]}... ({len(text)} characters)"
