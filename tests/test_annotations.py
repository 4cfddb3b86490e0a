"""The pod's pins, read from a downward-API annotations file: `datapin_sidecar.pins`.

* The file format is kubelet's (`fieldpath.FormatMap`: sorted `key=%q` lines, the last newline
  trimmed). The fixture below is such a file, as a literal, with what real pods carry: kubectl's
  `last-applied-configuration` (JSON full of `\\"`, `\\\\u0026` and a trailing `\\n`), a
  multi-line non-ASCII value and kubelet's own annotations. `format_downward_annotations` must
  reproduce it byte for byte, so tests that write annotation files write real ones.
* Go's quoting: outputs of `strconv.Quote` for each class of rune, every escape
  `strconv.Unquote` accepts (including byte escapes that spell UTF-8), every code point
  round-tripping, and hypothesis round-tripping arbitrary keys and values.
* Every malformed line, bad pin and missing file fails with an `AnnotationsError` that names
  the source, the line or dataset, and the fix, and never quotes a huge value in full.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datapin_sidecar import errors
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.pins import (
    ANNOTATION,
    AnnotationsError,
    Pin,
    format_downward_annotations,
    go_quote,
    parse_downward_annotations,
    parse_pins,
    read_pins,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from testkit.k8svolume import kubelet_update

MD5A = "0123456789abcdef0123456789abcdef"
MD5B = "fedcba9876543210fedcba9876543210"
SOURCE = "/etc/podinfo/annotations"
FILE_FIX = "the file must be a downward-API volume of metadata.annotations"

#: A downward-API file as kubelet writes it (no final newline).
KUBELET_FILE = (
    r'datapin.dev/pins="{\"coco\":{\"layout\":\"legacy\",\"pin\":\"fedcba9876543210fedcba98'
    r'76543210.dir\",\"ref\":\"v1\"},\"imagenet\":\"0123456789abcdef0123456789abcdef.dir\"}"'
    "\n"
    'example.com/notes="Données d\'entraînement — 日本語 🚀\\nsecond line\\twith a tab"'
    "\n"
    r'kubectl.kubernetes.io/last-applied-configuration="{\"apiVersion\":\"v1\",\"kind\":'
    r"\"Pod\",\"metadata\":{\"annotations\":{},\"labels\":{\"app\":\"train\"},\"name\":"
    r"\"train-0\",\"namespace\":\"ml\"},\"spec\":{\"containers\":[{\"command\":[\"sh\",\"-c\","
    r"\"echo \\\"ready\\\" \\u0026\\u0026 sleep 1\"],\"image\":\"python:3.11\",\"name\":"
    r'\"train\"}]}}\n"'
    "\n"
    r'kubernetes.io/config.seen="2024-05-01T10:00:00.123456789Z"'
    "\n"
    r'kubernetes.io/config.source="api"'
)


def test_parses_a_kubelet_file() -> None:
    annotations = parse_downward_annotations(KUBELET_FILE, source=SOURCE)
    assert list(annotations) == [
        ANNOTATION,
        "example.com/notes",
        "kubectl.kubernetes.io/last-applied-configuration",
        "kubernetes.io/config.seen",
        "kubernetes.io/config.source",
    ]
    assert annotations["example.com/notes"] == (
        "Données d'entraînement — 日本語 🚀\nsecond line\twith a tab"
    )
    applied = annotations["kubectl.kubernetes.io/last-applied-configuration"]
    assert applied.endswith("}}\n")
    spec = json.loads(applied)
    assert spec["spec"]["containers"][0]["command"] == ["sh", "-c", 'echo "ready" && sleep 1']
    assert annotations["kubernetes.io/config.source"] == "api"
    assert parse_pins(annotations, source=SOURCE) == {
        "coco": Pin(
            dataset="coco",
            revision=Revision(md5=MD5B, is_dir=True),
            layout=Layout.LEGACY,
            ref="v1",
        ),
        "imagenet": Pin(
            dataset="imagenet",
            revision=Revision(md5=MD5A, is_dir=True),
            layout=None,
            ref=f"{MD5A}.dir",
        ),
    }


def test_format_reproduces_the_kubelet_file() -> None:
    annotations = parse_downward_annotations(KUBELET_FILE, source=SOURCE)
    shuffled = dict(reversed(annotations.items()))
    assert format_downward_annotations(shuffled) == KUBELET_FILE


def test_trailing_newline_and_empty_file() -> None:
    assert parse_downward_annotations(KUBELET_FILE + "\n", source=SOURCE) == (
        parse_downward_annotations(KUBELET_FILE, source=SOURCE)
    )
    assert parse_downward_annotations("", source=SOURCE) == {}
    assert parse_downward_annotations("\n", source=SOURCE) == {}
    assert format_downward_annotations({}) == ""
    assert parse_downward_annotations('a=""', source=SOURCE) == {"a": ""}


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("hello", '"hello"'),
        # The example in Go's strconv documentation.
        ('"Fran & Freddie\'s Diner\t☺"', r'"\"Fran & Freddie' + "'" + r's Diner\t☺\""'),
        ("\a\b\f\n\r\t\v\\", r'"\a\b\f\n\r\t\v\\"'),
        ("\x00\x1b\x7f", r'"\x00\x1b\x7f"'),
        ("\u0085\u00a0\u00ad\u2028\ufeff\ue000", r'"\u0085\u00a0\u00ad\u2028\ufeff\ue000"'),
        ("\U000e0001\U0010ffff", r'"\U000e0001\U0010ffff"'),
        ("é e\u0301 日本 😀 \ufffd", '"é e\u0301 日本 😀 \ufffd"'),
    ],
)
def test_go_quote_matches_strconv_quote(value: str, quoted: str) -> None:
    assert go_quote(value) == quoted
    assert parse_downward_annotations(f"k={quoted}", source=SOURCE) == {"k": value}


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (r"\303\251", "é"),
        (r"\xc3\xA9", "é"),
        (r"\u00e9\U0001F600", "é😀"),
        (r"\101\x42", "AB"),
        (r"tab\tand\\backslash", "tab\tand\\backslash"),
        ("raw\tcontrol\x01 chars", "raw\tcontrol\x01 chars"),
        (r"\xf0\x9f\x98\x80", "😀"),
    ],
)
def test_unescapes_every_go_escape(body: str, value: str) -> None:
    assert parse_downward_annotations(f'k="{body}"', source=SOURCE) == {"k": value}


def test_every_code_point_round_trips() -> None:
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    text = format_downward_annotations({"all": everything})
    assert "\n" not in text
    assert parse_downward_annotations(text, source=SOURCE) == {"all": everything}


def test_format_refuses_a_lone_surrogate() -> None:
    with pytest.raises(ValueError, match="surrogate U\\+D800"):
        format_downward_annotations({"k": "a\ud800"})


def test_keys_holding_equals_and_quotes_round_trip() -> None:
    # Real annotation keys cannot hold these, but the parser does not rely on it.
    annotations = {'a="b': 'c="d', "a": "=", 'x="': "", "==": '"="'}
    text = format_downward_annotations(annotations)
    assert parse_downward_annotations(text, source=SOURCE) == annotations


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=20),
        st.text(max_size=40),
        max_size=6,
    )
)
def test_parse_inverts_format(annotations: dict[str, str]) -> None:
    text = format_downward_annotations(annotations)
    assert parse_downward_annotations(text, source=SOURCE) == annotations
    assert parse_downward_annotations(text + "\n", source=SOURCE) == annotations


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("just words", 1, "no '='"),
        ('a="1"\nb=2', 2, "the value of 'b' is not a double-quoted string: '2'"),
        ('a="unterminated', 1, "has no closing '\"'"),
        ('a="x"y"', 1, "text after the closing '\"' at column 5 in the value of 'a'"),
        ('a="x" ', 1, "text after the closing"),
        ('a="\\q"', 1, "invalid escape '\\\\q' at column 4"),
        ('a="\\\'"', 1, "invalid escape"),  # `\'` is for rune literals only
        ('a="\\x4"', 1, "invalid escape '\\\\x'"),
        ('a="\\400"', 1, "above \\377"),
        ('a="\\ud800"', 1, "not a valid Unicode code point"),
        ('a="\\U00110000"', 1, "not a valid Unicode code point"),
        ('a="\\xff"', 1, "not valid UTF-8 after unescaping"),
        ('="x"', 1, "empty key"),
        ('a="1"\n\nb="2"', 2, "empty line"),
        ('a="1"\r\nb="2"', 1, "text after the closing"),
        ('a="1"\na="2"', 2, "duplicate key 'a'"),
    ],
)
def test_malformed_lines_name_the_line_and_the_fix(text: str, line: int, problem: str) -> None:
    with pytest.raises(AnnotationsError) as caught:
        parse_downward_annotations(text, source=SOURCE)
    err = caught.value
    assert isinstance(err, errors.AnnotationsError)
    assert isinstance(err, errors.UsageError)
    assert (err.reason, err.exit_code, err.line, err.source) == ("annotations", 2, line, SOURCE)
    assert str(err).startswith(f"{SOURCE} line {line}: ")
    assert problem in str(err)
    assert f"Fix: {FILE_FIX}" in str(err)


def test_errors_do_not_quote_huge_values() -> None:
    huge = "x" * 100_000
    for text in (f"k={huge}", f'k="{huge}', f'k="{huge}"{huge}', f"{huge}", f'k="\\q{huge}"'):
        with pytest.raises(AnnotationsError) as caught:
            parse_downward_annotations(text, source=SOURCE)
        assert len(str(caught.value)) < 500
        assert "x" * 61 not in str(caught.value)


def test_many_equals_quote_candidates_parse_quickly() -> None:
    # Each failed split stops at the next `="`: linear, not quadratic, in the line's length.
    key = 'k="' * 50_000
    text = format_downward_annotations({key: "v"})
    assert parse_downward_annotations(text, source=SOURCE) == {key: "v"}


# --- pins -----------------------------------------------------------------------------------


def pins_of(value: object) -> dict[str, Pin]:
    text = value if isinstance(value, str) else json.dumps(value)
    return parse_pins({ANNOTATION: text, "other": "x"}, source=SOURCE)


def test_pin_forms_and_layouts() -> None:
    pins = pins_of(
        {
            "a": f"{MD5A}.dir",
            "b.c-d": {"pin": f"{MD5B}.dir"},
            "e": {"pin": f"{MD5A}.dir", "layout": "dvc3", "ref": "main"},
            "f": {"pin": f"{MD5A}.dir", "layout": "auto"},
            "g": {"pin": f"{MD5A.upper()}.dir", "ref": "v2"},
        }
    )
    assert list(pins) == ["a", "b.c-d", "e", "f", "g"]
    assert pins["a"] == Pin(
        dataset="a", revision=Revision.parse(f"{MD5A}.dir"), layout=None, ref=f"{MD5A}.dir"
    )
    assert (pins["b.c-d"].layout, pins["b.c-d"].ref) == (None, f"{MD5B}.dir")
    assert (pins["e"].layout, pins["e"].ref) == (Layout.DVC3, "main")
    assert pins["f"].layout is None
    assert pins["g"].revision.oid == f"{MD5A}.dir"


def test_dataset_name_length_limit() -> None:
    longest = "a" * 253
    assert list(pins_of({longest: f"{MD5A}.dir"})) == [longest]
    with pytest.raises(AnnotationsError, match="not a valid dataset name"):
        pins_of({longest + "a": f"{MD5A}.dir"})


@pytest.mark.parametrize(
    ("value", "dataset", "problem"),
    [
        ("{not json", None, "not valid JSON (Expecting property name"),
        ('["a"]', None, "not a JSON object"),
        ("{}", None, "no datasets"),
        (f'{{"a": "{MD5A}.dir", "a": "{MD5B}.dir"}}', None, "duplicate key 'a'"),
        ({"ImageNet": f"{MD5A}.dir"}, "ImageNet", "not a valid dataset name"),
        ({"-a": f"{MD5A}.dir"}, "-a", "not a valid dataset name"),
        ({"a.": f"{MD5A}.dir"}, "a.", "not a valid dataset name"),
        ({"a_b": f"{MD5A}.dir"}, "a_b", "not a valid dataset name"),
        ({"": f"{MD5A}.dir"}, "", "not a valid dataset name"),
        ({"a": "v1"}, "a", "pin 'v1' is not a DVC object id"),
        ({"a": MD5A}, "a", "names a single file, not a directory"),
        ({"a": 3}, "a", 'the pin must be a string "<md5>.dir" or an object, not 3'),
        ({"a": {"pin": f"{MD5A}.dir", "lyout": "dvc3"}}, "a", "unknown key(s) 'lyout'"),
        ({"a": {"layout": "dvc3"}}, "a", 'no "pin": "<md5>.dir" string'),
        ({"a": {"pin": None}}, "a", 'no "pin"'),
        ({"a": {"pin": f"{MD5A}.dir", "layout": "dvc2"}}, "a", 'layout "dvc2" is not one of'),
        ({"a": {"pin": f"{MD5A}.dir", "layout": 3}}, "a", "layout 3 is not one of"),
        ({"a": {"pin": f"{MD5A}.dir", "ref": ""}}, "a", 'ref "" is not a non-empty string'),
        ({"a": {"pin": f"{MD5A}.dir", "ref": 1}}, "a", "ref 1 is not"),
    ],
)
def test_bad_pins_name_the_dataset_and_the_fix(
    value: object, dataset: str | None, problem: str
) -> None:
    with pytest.raises(AnnotationsError) as caught:
        pins_of(value)
    err = caught.value
    message = str(err)
    assert err.dataset == dataset
    assert message.startswith(f"annotation {ANNOTATION} in {SOURCE}")
    if dataset is not None:
        assert f"dataset {dataset!r}: " in message
    assert problem in message
    assert "Fix: " in message
    assert "JSON object of dataset name" in message


def test_bad_json_quotes_only_the_start_of_a_huge_value() -> None:
    huge = json.dumps({"a": f"{MD5A}.dir", "pad": "x" * 100_000})[:-1]
    with pytest.raises(AnnotationsError, match="not valid JSON") as caught:
        pins_of(huge)
    assert len(str(caught.value)) < 700


def test_missing_annotation() -> None:
    with pytest.raises(AnnotationsError) as caught:
        parse_pins({"other": "x"}, source=SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: no {ANNOTATION} annotation: the pod was not admitted")
    assert "Fix: check that the datapin webhook is installed" in message


# --- the file -------------------------------------------------------------------------------


def test_read_pins_follows_kubelet_updates(tmp_path: Path) -> None:
    volume = tmp_path / "podinfo"
    first = {ANNOTATION: json.dumps({"data": f"{MD5A}.dir"}), "x": "1"}
    kubelet_update(volume, {"annotations": format_downward_annotations(first)}, "2024_01")
    assert read_pins(volume / "annotations")["data"].revision.md5 == MD5A
    second = {ANNOTATION: json.dumps({"data": {"pin": f"{MD5B}.dir", "ref": "v2"}}), "x": "1"}
    kubelet_update(volume, {"annotations": format_downward_annotations(second)}, "2024_02")
    pin = read_pins(volume / "annotations")["data"]
    assert (pin.revision.md5, pin.ref) == (MD5B, "v2")


def test_read_pins_without_the_volume(tmp_path: Path) -> None:
    with pytest.raises(AnnotationsError) as caught:
        read_pins(tmp_path / "annotations")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'annotations'}: the annotations file does not exist")
    assert "Fix: mount a downward-API volume of metadata.annotations" in message
    with pytest.raises(AnnotationsError, match="is a directory"):
        read_pins(tmp_path)


def test_read_pins_refuses_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    path.write_bytes(b'a="1"\nb="\xff"')
    with pytest.raises(AnnotationsError) as caught:
        read_pins(path)
    assert (caught.value.line, caught.value.source) == (2, str(path))
    assert "not valid UTF-8" in str(caught.value)


def test_read_pins_reports_the_file_for_a_bad_annotation(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    path.write_text(format_downward_annotations({ANNOTATION: '{"Bad": "x"}'}))
    with pytest.raises(AnnotationsError, match=re.escape(f"in {path} dataset 'Bad': not a valid")):
        read_pins(path)
