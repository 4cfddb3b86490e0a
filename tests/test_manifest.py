"""DVC formats: `.dir` manifests, `.dvc` files, `dvc.lock`, and object hashing.

Bad manifests must fail with an error that names the manifest and the offending entry, because
that message is what a user sees in `kubectl describe pod`. The 1M-entry test runs in a child
process so its peak RSS is measured cleanly, against the 256 MiB budget of the issue.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from datapin_sidecar.engine.hashing import Layout, ObjectHasher, hash_file, is_text_block
from datapin_sidecar.engine.manifest import Manifest, diff
from datapin_sidecar.engine.revision import Revision, find_out, read_dvc_file, read_dvc_lock
from datapin_sidecar.errors import ManifestError, RevisionError

MD5A = "0" * 31 + "a"
MD5B = "0" * 31 + "b"


def dvc_bytes(entries: list[tuple[str, str]]) -> bytes:
    """What DVC writes for these entries (its own code: json.dumps sort_keys, sorted)."""
    rows = [{"md5": m, "relpath": r} for r, m in sorted(entries)]
    return json.dumps(rows, sort_keys=True).encode()


def test_parses_dvc_bytes_and_round_trips() -> None:
    entries = [("b/c.txt", MD5A), ("a.txt", MD5B), ("données/é.bin", MD5A), ("z z", MD5B)]
    raw = dvc_bytes(entries)
    m = Manifest.parse(raw, source="x.dir")
    assert [(e.relpath, e.md5) for e in m] == sorted(entries)
    assert m.dumps() == raw


def test_non_canonical_json_still_loads() -> None:
    raw = b'[\n {"relpath": "b", "md5": "%s"},\n {"md5": "%s", "relpath": "a"}\n]' % (
        MD5A.encode(),
        MD5B.encode(),
    )
    m = Manifest.parse(raw, source="hand.dir")
    assert [e.relpath for e in m] == ["a", "b"]


@pytest.mark.parametrize(
    ("relpaths", "entry", "problem"),
    [
        (["/etc/passwd"], "/etc/passwd", "absolute path"),
        (["a/../../x"], "a/../../x", "'..'"),
        (["a//b"], "a//b", "empty path segment"),
        (["a/"], "a/", "empty path segment"),
        ([""], "''", "empty relpath"),
        (["a/./b"], "a/./b", "'.' segment"),
        (["x", "x"], "x", "duplicate path"),
        (["a", "a-1", "a/b"], "a/b", "both a file and a parent directory"),
        (["d/f", "d/f/g"], "d/f/g", "both a file and a parent directory"),
    ],
)
def test_rejects_unsafe_paths_naming_manifest_and_entry(
    relpaths: list[str], entry: str, problem: str
) -> None:
    raw = json.dumps([{"md5": MD5A, "relpath": r} for r in relpaths]).encode()
    with pytest.raises(ManifestError) as err:
        Manifest.parse(raw, source="/cache/ab/cdef.dir")
    message = str(err.value)
    assert "/cache/ab/cdef.dir" in message
    assert entry.strip("'") in message
    assert problem in message
    assert "Fix:" in message


def test_rejects_nul_in_relpath() -> None:
    raw = json.dumps([{"md5": MD5A, "relpath": "a\u0000b"}]).encode()
    with pytest.raises(ManifestError, match="NUL"):
        Manifest.parse(raw, source="m.dir")


@pytest.mark.parametrize(
    "raw",
    [b"", b"{}", b"[1, 2]", b'[{"md5": "xyz", "relpath": "a"}]', b'[{"relpath": "a"}]', b"[{"],
)
def test_rejects_malformed_documents(raw: bytes) -> None:
    with pytest.raises(ManifestError, match=r"invalid DVC manifest m\.dir"):
        Manifest.parse(raw, source="m.dir")


def test_unsorted_input_is_sorted_like_dvc() -> None:
    m = Manifest.from_entries([("b", MD5A), ("a/z", MD5B), ("a-x", MD5A)], source="t")
    # Code-point order, the order DVC sorts by: '-' (0x2d) < '/' (0x2f).
    assert [e.relpath for e in m] == ["a-x", "a/z", "b"]


def test_diff_plans_only_changes() -> None:
    old = Manifest.from_entries([("keep", MD5A), ("gone", MD5A), ("edit", MD5A)], source="o")
    new = Manifest.from_entries([("keep", MD5A), ("edit", MD5B), ("new", MD5B)], source="n")
    plan = diff(old, new)
    assert sorted(old.relpath(i) for i in plan.remove) == ["edit", "gone"]
    assert sorted(new.relpath(i) for i in plan.add) == ["edit", "new"]
    assert plan.unchanged == 1


def test_million_entries_load_within_memory_budget(tmp_path: Path) -> None:
    """1,000,000 entries (≈ 90 MB of JSON) load in a process peaking under 256 MiB RSS.

    The file is written here and parsed by a fresh child, so only loading is measured.
    """
    n = 1_000_000
    path = tmp_path / "big.dir"
    with path.open("w") as f:
        f.write("[")
        for i in range(n):
            sep = ", " if i else ""
            f.write(f'{sep}{{"md5": "{i:032x}", "relpath": "d{i // 1000:04d}/f-{i:07d}.jpg"}}')
        f.write("]")
    script = textwrap.dedent(
        f"""
        from datapin_sidecar.engine.manifest import Manifest
        with open({str(path)!r}, "rb") as f:
            m = Manifest.parse(f.read(), source="big.dir")
        assert len(m) == {n}
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the forking parent,
        # so a large pytest process would count against the child.
        with open("/proc/self/status") as f:
            print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    peak_mib = int(out.strip()) / 1024
    assert peak_mib < 256, f"peak RSS {peak_mib:.0f} MiB"


# -- revisions and DVC files ----------------------------------------------------------------


def test_revision_parse() -> None:
    assert Revision.parse(MD5A + ".dir") == Revision(md5=MD5A, is_dir=True)
    assert Revision.parse(MD5A.upper()).oid == MD5A
    with pytest.raises(RevisionError, match=r"not a DVC object id.*Fix"):
        Revision.parse("v1.0")


def test_dvc_file_and_lock(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text(
        f"outs:\n- md5: {MD5A}.dir\n  size: 3040\n  nfiles: 7\n  hash: md5\n  path: data\n"
    )
    (tmp_path / "old.dvc").write_text(f"outs:\n- md5: {MD5B}\n  size: 3\n  path: model.bin\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: python prep.py\n"
        f"    deps:\n    - path: raw\n      hash: md5\n      md5: {MD5B}.dir\n"
        f"    outs:\n    - path: features\n      hash: md5\n      md5: {MD5A}.dir\n"
        "      size: 10\n      nfiles: 2\n"
    )
    (out,) = read_dvc_file(tmp_path / "data.dvc")
    assert (out.path, out.revision.oid, out.layout, out.nfiles) == (
        "data",
        f"{MD5A}.dir",
        Layout.DVC3,
        7,
    )
    (legacy,) = read_dvc_file(tmp_path / "old.dvc")
    assert legacy.layout is Layout.LEGACY
    assert not legacy.revision.is_dir
    stages = read_dvc_lock(tmp_path / "dvc.lock")
    found = find_out(stages["prepare"], "features/", source="dvc.lock")
    assert found.revision.oid == f"{MD5A}.dir"
    with pytest.raises(RevisionError, match="its outs are: features"):
        find_out(stages["prepare"], "nope", source="dvc.lock")


def test_dvc_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dvc"
    bad.write_text("outs:\n- path: data\n")
    with pytest.raises(ManifestError, match=r"bad\.dvc.*outs\[0\]"):
        read_dvc_file(bad)
    with pytest.raises(RevisionError, match="does not exist"):
        read_dvc_file(tmp_path / "missing.dvc")


# -- hashing -------------------------------------------------------------------------------------


def test_legacy_hash_folds_crlf_only_for_text(tmp_path: Path) -> None:
    text = b"line one\r\nline two\r\n" * 100
    binary = b"\x00\x01\r\n\xff" * 100
    assert is_text_block(text[:512])
    assert not is_text_block(binary[:512])
    for data, folded in ((text, text.replace(b"\r\n", b"\n")), (binary, binary)):
        path = tmp_path / "f"
        path.write_bytes(data)
        assert hash_file(path, Layout.LEGACY) == hashlib.md5(folded).hexdigest()
        assert hash_file(path, Layout.DVC3) == hashlib.md5(data).hexdigest()


def test_legacy_hasher_is_independent_of_write_chunking() -> None:
    data = (b"abc\r\n" * 300_000) + b"tail"  # > 1 MiB: crosses DVC 2's read boundary
    whole = ObjectHasher(Layout.LEGACY)
    whole.update(data)
    pieces = ObjectHasher(Layout.LEGACY)
    for i in range(0, len(data), 4099):
        pieces.update(data[i : i + 4099])
    assert whole.hexdigest() == pieces.hexdigest()


def test_parsed_form_round_trips_and_refuses_damage() -> None:
    m = Manifest.from_entries([("a/b", MD5A), ("données", MD5B), ("z", MD5A)], source="t")
    blob = m.to_bytes()
    back = Manifest.from_bytes(blob, source="t")
    assert back is not None
    assert list(back) == list(m)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    assert Manifest.from_bytes(bytes(flipped), source="t") is None
    assert Manifest.from_bytes(blob[:-5], source="t") is None
    assert Manifest.from_bytes(b"not a manifest", source="t") is None


def test_diff_fast_path_for_content_only_changes() -> None:
    n = 1000
    old = Manifest.from_entries([(f"f{i:04d}", f"{i:032x}") for i in range(n)], source="o")
    changed = {3, 17, 500, 999}
    new = Manifest.from_entries(
        [(f"f{i:04d}", f"{i + (10**6 if i in changed else 0):032x}") for i in range(n)],
        source="n",
    )
    plan = diff(old, new)
    assert sorted(plan.add) == sorted(plan.remove) == sorted(changed)
    assert plan.unchanged == n - len(changed)
