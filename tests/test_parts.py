"""A part of a revision (issue 18): some folders of a `.dir`, fetched and published alone.

What users depend on, on real components:

* the tree of a part equals what real `dvc checkout <path>` puts in a workspace, byte for byte,
  for DVC 3 and for DVC 2.58's legacy layout (whose CRLF text objects are md5-dos2unix);
* nothing outside the part is fetched: the fault proxy in front of a real SeaweedFS counts the
  GETs of object keys, and a later whole-revision run on the same node fetches only the rest
  (one download per object in total), also when the two run at once in two sidecars;
* every spelling DVC users know selects the part: `--path`, `--target data.dvc:data/x` and
  `--target data/x`;
* a folder the revision lacks, a file named as a folder and a traversal are refused with the
  folders the revision has as the hint, nothing is published and nothing but the `.dir` is
  fetched;
* switches within a part stay O(changed), and the pins' `paths` reach the sidecar's tree, its
  `/status` and `datapin_revision_info`.
"""

from __future__ import annotations

import collections
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from datapin_sidecar import cli
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.materialize import Request, Result, materialize
from datapin_sidecar.engine.part import Part, folders
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import PathNotInRevisionError, UsageError
from datapin_sidecar.pins import ANNOTATION, PinRecord, format_pins, parse_pins
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit import rmtree_robust
from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import DvcFixture, run_dvc, run_git, tree_bytes
from testkit.faultproxy import FaultProxy
from testkit.sidecarproc import Pod, SidecarProcess
from testkit.trees import object_name, put_revision


@pytest.fixture(params=[3, 2], ids=["dvc3", "dvc2"])
def fx(request: pytest.FixtureRequest) -> DvcFixture:
    fixture: DvcFixture = request.getfixturevalue(f"dvc{request.param}_fixture")
    return fixture


def under(files: dict[str, bytes], *folders_: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if any(k.startswith(f + "/") for f in folders_)}


def dvc_checkout_paths(fx: DvcFixture, work: Path, *paths: str) -> dict[str, bytes]:
    """Real `dvc checkout data/<path>...` in a clone of the fixture: DVC's own granular
    checkout, the reference a part must equal."""
    work.mkdir(parents=True)
    run_git(work, "clone", "-q", str(fx.repo), ".")
    run_dvc(fx.dvc, work, "cache", "dir", str(fx.cache))
    run_dvc(fx.dvc, work, "config", "cache.type", "copy")
    rmtree_robust(work / fx.name)
    run_dvc(fx.dvc, work, "checkout", *(f"{fx.name}/{p}" for p in paths))
    return tree_bytes(work / fx.name)


# -- the tree of a part is DVC's -----------------------------------------------------------------


@pytest.mark.parametrize(
    "paths",
    [("text",), ("a/b", "données"), ("dup/nested",)],
    ids=["crlf-text", "nested-and-unicode", "shared-object"],
)
def test_a_part_equals_dvc_checkout_of_the_path(
    fx: DvcFixture, xfs_dir: Path, paths: tuple[str, ...]
) -> None:
    """`text/` holds the CRLF files whose legacy names are md5-dos2unix; `dup/nested` shares
    its object with a file outside the part, which must not appear."""
    expected = dvc_checkout_paths(fx, xfs_dir / "dvc", *paths)
    assert expected == under(fx.files, *paths)  # DVC checked out the part, and only it
    result = materialize(
        Request(
            cache=NodeCache(xfs_dir / "cache"),
            revision=Revision.parse(fx.rev),
            dest=xfs_dir / "pod",
            remote=DirectoryRemote(fx.remote),
            part=Part.parse(paths),
        )
    )
    assert tree_bytes((xfs_dir / "pod" / "current").resolve()) == expected
    assert result.files == len(expected)
    assert result.paths == tuple(sorted(paths, key=lambda p: p.encode()))
    # Only the part's objects (and the .dir) reached the node cache.
    assert result.fetched_objects == len(set(map(_md5_of(fx), expected.values()))) + 1


def _md5_of(fx: DvcFixture) -> Callable[[bytes], str]:
    """The object name each content has in the fixture's layout."""
    layout = Layout.DVC3 if fx.version == 3 else Layout.LEGACY
    return lambda data: object_name(data, layout)


# -- only the part is fetched; the whole later fetches the rest ----------------------------------


def _cli_s3(fx: S3DvcFixture, proxy: FaultProxy, cache: Path, dest: Path, *extra: str) -> int:
    return cli.main(
        [
            "materialize",
            "--cache", str(cache),
            "--dest", str(dest),
            "--remote", fx.remote_url,
            "--endpoint-url", proxy.endpoint,
            "--json", "--quiet",
            *extra,
        ]
    )  # fmt: skip


def _object_gets(proxy: FaultProxy, fx: S3DvcFixture) -> collections.Counter[str]:
    """GETs per object key (the `.dir` included), whatever their answer (an empty object's
    ranged GET is a 416) but 404 (`auto` looks for the `.dir` in the DVC 3 layout first), from
    the proxy's records. The `.dir` is counted once: it is probed with a one-byte GET before
    it is fetched."""
    gets = collections.Counter(
        r.path for r in proxy.gets() if f"/{fx.prefix}/" in r.path and r.status != 404
    )
    return collections.Counter({k: 1 if k.endswith(".dir") else n for k, n in gets.items()})


@pytest.mark.parametrize("version", [3, 2])
def test_only_the_part_is_fetched_and_the_whole_later_fetches_the_rest(
    version: int,
    request: pytest.FixtureRequest,
    fault_proxy: FaultProxy,
    xfs_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fx: S3DvcFixture = request.getfixturevalue(f"dvc{version}_s3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", fx.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fx.secret_key)
    cache = xfs_dir / "cache"
    part = ("shards", "text")
    code = _cli_s3(
        fx,
        fault_proxy,
        cache,
        xfs_dir / "train",
        "--rev",
        fx.rev,
        "--path",
        "shards",
        "--path",
        "text/",
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    first = json.loads(out.out)
    assert first["paths"] == list(part)
    assert tree_bytes((xfs_dir / "train" / "current").resolve()) == under(fx.files, *part)
    objects = _md5_of(fx.dvc)
    part_objects = {objects(v) for v in under(fx.files, *part).values()}
    all_objects = {objects(v) for v in fx.files.values()}
    assert part_objects < all_objects
    gets = _object_gets(fault_proxy, fx)
    fetched = {key.rsplit("/", 2)[-2] + key.rsplit("/", 1)[-1] for key in gets}
    assert fetched == part_objects | {fx.rev}, "a GET outside the part (or a part object missed)"
    assert set(gets.values()) == {1}, {k: n for k, n in gets.items() if n > 1}
    assert first["fetched_objects"] == len(part_objects) + 1

    # The whole revision on the same node: only what the part did not hold comes over the wire.
    code = _cli_s3(fx, fault_proxy, cache, xfs_dir / "all", "--rev", fx.rev)
    out = capsys.readouterr()
    assert code == 0, out.err
    whole = json.loads(out.out)
    assert whole["paths"] == []
    assert tree_bytes((xfs_dir / "all" / "current").resolve()) == fx.files
    assert whole["fetched_objects"] == len(all_objects - part_objects)
    gets = _object_gets(fault_proxy, fx)
    assert len(gets) == len(all_objects) + 1
    assert set(gets.values()) == {1}, "an object was downloaded twice on one node"


def test_two_sidecars_part_and_whole_at_once_download_each_object_once(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
) -> None:
    """Two pods of two Jobs start on one node together, one asking for `d1,d2`, one for the
    whole revision: each object crosses the wire once, and each pod gets exactly its tree."""
    a, _ = dvc3_revisions
    fault_proxy.latency(0.005, method="GET", times=None)  # keep the two in each other's way
    train = Pod(xfs_dir, tmp_path / "train", a, fault_proxy.endpoint)
    train.pin(a.rev, "v1", paths=["d1", "d2"])
    full = Pod(xfs_dir, tmp_path / "full", a, fault_proxy.endpoint)
    full.pin(a.rev, "v1")
    with (
        SidecarProcess("once", tmp_path / "train", train.settings()) as one,
        SidecarProcess("once", tmp_path / "full", full.settings()) as two,
    ):
        assert one.wait(180) == 0, one.output()
        assert two.wait(180) == 0, two.output()
    assert tree_bytes(train.current.resolve()) == under(a.files, "d1", "d2")
    assert tree_bytes(full.current.resolve()) == a.files
    gets = _object_gets(fault_proxy, a)
    distinct = {object_name(v) for v in a.files.values()}
    assert len(gets) == len(distinct) + 1
    assert set(gets.values()) == {1}, {k: n for k, n in gets.items() if n > 1}


# -- the spellings DVC users know ----------------------------------------------------------------


def test_dvc_target_forms_select_the_same_part(
    dvc3_fixture: DvcFixture, xfs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = dvc3_fixture
    expected = under(fx.files, "a/b")
    for n, extra in enumerate(
        (
            ["--rev", fx.rev, "--path", "a/b"],
            ["--dvc-repo", str(fx.repo), "--target", "data.dvc:data/a/b"],
            ["--dvc-repo", str(fx.repo), "--target", "data/a/b/"],
        )
    ):
        args = ["materialize", "--cache", str(xfs_dir / "cache"), "--dest", str(xfs_dir / f"p{n}")]
        code = cli.main([*args, "--remote", str(fx.remote), "--quiet", "--json", *extra])
        out = capsys.readouterr()
        assert code == 0, (extra, out.err)
        assert json.loads(out.out)["paths"] == ["a/b"]
        assert tree_bytes((xfs_dir / f"p{n}" / "current").resolve()) == expected, extra


def test_the_summary_says_which_part(dvc3_fixture: DvcFixture, xfs_dir: Path) -> None:
    fx = dvc3_fixture
    done = subprocess.run(
        [
            "datapin", "materialize", "--cache", str(xfs_dir / "c"), "--dest", str(xfs_dir / "d"),
            "--rev", fx.rev, "--remote", str(fx.remote), "--path", "text", "--quiet",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"published {fx.rev} at {xfs_dir / 'd' / 'current'} (only text)" in done.stdout


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code", "says"),
    [
        ("shard", 3, "has no folder 'shard'"),
        ("a/b/nope", 3, "'a/b' holds: c"),
        ("README.txt", 3, "is a file in revision"),
        ("a/b/sibling.bin", 3, "name its folder ('a/b')"),
        ("../etc", 2, "'..' segment escapes the tree"),
        ("/etc", 2, "absolute path"),
        ("a//b", 2, "empty path segment"),
        (".", 2, "names the revision's root"),
    ],
)
def test_a_bad_path_is_refused_with_the_folders_as_the_hint(
    dvc3_s3: S3DvcFixture,
    fault_proxy: FaultProxy,
    xfs_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    code: int,
    says: str,
) -> None:
    fx = dvc3_s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", fx.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fx.secret_key)
    dest = xfs_dir / "pod"
    got = _cli_s3(fx, fault_proxy, xfs_dir / "cache", dest, "--rev", fx.rev, "--path", path)
    err = capsys.readouterr().err
    assert got == code, err
    assert says in err, err
    assert "Fix:" in err
    if code == 3:  # the revision was read: the hint lists its top-level folders
        assert "top-level folders are: a, bin, données, dup, shards, text, with space" in err
    assert not (dest / "current").exists()
    fetched = _object_gets(fault_proxy, fx)
    assert set(fetched) <= {k for k in fetched if k.endswith(".dir")}, "objects were fetched"


def test_part_values_are_normalised_to_one_spelling_and_key() -> None:
    a = Part.parse(["images/train/", "./images/val", "images/train/cats"])
    b = Part.parse(["images/val,images/train"])
    assert a == b
    assert a.paths == ("images/train", "images/val")
    assert a.suffix == b.suffix
    assert a.suffix.startswith("-p")
    assert len(a.suffix) == 18
    assert Part.parse(["images"]).suffix != a.suffix
    assert Part.WHOLE.suffix == ""
    assert Part.parse([""]).whole
    with pytest.raises(UsageError, match="at most 64"):
        Part.parse([",".join(f"f{i}" for i in range(65))])


def test_selection_is_exact_at_prefix_boundaries() -> None:
    """`train` must not take `train-extra/` or `train0.txt` (they sort around `train/`)."""
    m = Manifest.from_entries(
        [
            ("images/train-extra/z", "6" * 32),
            ("images/train/a.jpg", "0" * 32),
            ("images/train/b/c.jpg", "1" * 32),
            ("images/train0.txt", "2" * 32),
            ("images/val/c", "3" * 32),
            ("readme", "5" * 32),
        ],
        source="t",
    )
    got = Part.parse(["images/train"]).select(m, revision="r.dir")
    assert [e.relpath for e in got] == ["images/train/a.jpg", "images/train/b/c.jpg"]
    assert folders(m) == ["images"]
    assert folders(m, "images") == ["train", "train-extra", "val"]
    with pytest.raises(PathNotInRevisionError, match="is a file"):
        Part.parse(["images/train0.txt"]).select(m, revision="r.dir")


# -- switches within a part ----------------------------------------------------------------------


def test_switches_within_a_part_are_o_changed(tmp_path: Path, xfs_dir: Path) -> None:
    remote = NodeCache(tmp_path / "remote")
    a = {f"d{i % 4}/f{i:03d}.bin": f"a{i}".encode() * 50 for i in range(200)}
    b = dict(a)
    for k in list(a)[:40]:  # 10 of them in d1
        b[k] = k.encode() * 3
    rev_a, rev_b = put_revision(remote, a), put_revision(remote, b)
    cache = NodeCache(xfs_dir / "cache")
    part = Part.parse(["d1"])

    def to(rev: Revision, p: Part = part) -> Result:
        return materialize(
            Request(
                cache=cache,
                revision=rev,
                dest=xfs_dir / "pod",
                remote=DirectoryRemote(remote.root),
                part=p,
            )
        )

    first = to(rev_a)
    assert first.base == "fresh"
    assert first.files == 50
    switch = to(rev_b)
    assert switch.base == "published"
    assert (switch.misses, switch.reused, switch.removed) == (10, 40, 10)
    assert tree_bytes((xfs_dir / "pod" / "current").resolve()) == under(b, "d1")
    back = to(rev_a)
    assert back.base == "spare"  # the rollback recycles the part's previous tree
    assert back.fetched_objects == 0
    assert tree_bytes((xfs_dir / "pod" / "current").resolve()) == under(a, "d1")
    assert to(rev_a).noop
    grow = to(rev_a, Part.WHOLE)  # the same revision, all of it: a part's tree is a base
    assert grow.base in {"published", "spare"}
    assert grow.reused >= 40
    assert grow.fetched_objects == 150  # the objects outside d1, once
    assert tree_bytes((xfs_dir / "pod" / "current").resolve()) == a


# -- pins and the sidecar ------------------------------------------------------------------------


def test_pins_carry_the_part_both_ways() -> None:
    record = PinRecord(
        dataset="images",
        pin="3f0c5e1a9b2d4c6e8f0a1b2c3d4e5f60.dir",
        ref="v2",
        layout="dvc3",  # type: ignore[arg-type]
        part=Part.parse(["val", "train/"]),
    )
    text = format_pins([record])[ANNOTATION]
    assert json.loads(text)["images"]["paths"] == ["train", "val"]
    pin = parse_pins({ANNOTATION: text}, source="the test")["images"]
    assert pin.part == record.part
    whole = format_pins([PinRecord(dataset="x", pin=record.pin, ref="v", layout=record.layout)])
    assert "paths" not in whole[ANNOTATION]
    from datapin_sidecar.errors import AnnotationsError  # noqa: PLC0415

    for bad in (["../x"], "train", [1]):
        value = json.dumps({"images": {"pin": record.pin, "paths": bad}})
        with pytest.raises(AnnotationsError, match="paths"):
            parse_pins({ANNOTATION: value}, source="the test")


def test_the_sidecar_serves_the_part_its_pins_name_and_labels_it(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
) -> None:
    a, b = dvc3_revisions
    pod = Pod(xfs_dir, tmp_path, a, fault_proxy.endpoint)
    pod.pin(a.rev, "v1", paths=["d3"])
    with SidecarProcess("run", tmp_path, pod.settings(watch_interval_seconds=0.2)) as proc:
        proc.wait_until("the part served", lambda: _serving(proc, a.rev))
        assert tree_bytes(pod.current.resolve()) == under(a.files, "d3")
        status = proc.status()["datasets"]["images"]["serving"]
        assert status["path"] == "d3"
        info = {"dataset": "images", "revision": "v1", "pin": a.rev, "path": "d3"}
        assert proc.sample("datapin_revision_info", **info) == 1
        # A new pin for the same part: a live switch that keeps the part.
        pod.pin(b.rev, "v2", paths=["d3"])
        proc.wait_until("the switch", lambda: _serving(proc, b.rev))
        assert tree_bytes(pod.current.resolve()) == under(b.files, "d3")
        assert proc.stop() == 0


def _serving(proc: SidecarProcess, rev: str) -> bool:
    serving = proc.status()["datasets"]["images"]["serving"]
    return serving is not None and serving["pin"] == rev


def test_a_record_naming_another_part_than_its_key_is_not_trusted(
    tmp_path: Path, xfs_dir: Path
) -> None:
    """A record is trusted only for the part its key names: one edited to name another part
    (or a traversal) is read as absent, so the tree is rebuilt rather than served."""
    remote = NodeCache(tmp_path / "remote")
    files = {f"d{i % 2}/f{i}.bin": f"x{i}".encode() for i in range(10)}
    rev = put_revision(remote, files)
    cache = NodeCache(xfs_dir / "cache")
    request = Request(
        cache=cache,
        revision=rev,
        dest=xfs_dir / "pod",
        remote=DirectoryRemote(remote.root),
        part=Part.parse(["d0"]),
    )
    built = materialize(request)
    key = Path(built.tree).name
    assert key == rev.md5 + Part.parse(["d0"]).suffix
    assert materialize(request).noop
    meta = xfs_dir / "pod" / ".revs" / ".meta" / f"{key}.json"
    for forged in (["d1"], ["../d0"], "d0"):
        record = json.loads(meta.read_text())
        record["paths"] = forged
        meta.write_text(json.dumps(record))
        again = materialize(request)
        assert not again.noop, forged
        assert tree_bytes((xfs_dir / "pod" / "current").resolve()) == under(files, "d0")
