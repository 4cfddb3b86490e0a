"""Revisions to pins: literal ids, named revisions and git refs of a real DVC 3 repository.

One module-scoped repository made by real git and real DVC 3 (``make_dvc_repo``) carries the
history the tests resolve against::

    c1  data v1                          tags v1 (lightweight), v1-annotated (annotated)
    c2  data v2                          tag  v2 (annotated)
    c3  + dvc.lock stage `gen` (dvc repro), single.txt.dvc (a file out), legacy.dvc (no
          `hash:`, DVC 2 style), multi.dvc (two outs)                       branch main
    c4  data v3, from c2                 branch exp

Expected pins are read independently (``git show <commit>:data.dvc`` and YAML), never through
the code under test. The repository is served as a ``file://`` URL, as a plain path, and over
smart HTTP with basic auth (``git http-backend``). The origin allows partial-clone filters as
GitHub and GitLab do, so the blob of the `.dvc` file really is fetched lazily; the HTTP copy does
not, so the no-filter path runs too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from datapin_operator.api.models import DatasetSpec
from datapin_operator.errors import GitError, PinReadError, UnknownRevisionError
from datapin_operator.resolve.gitsource import GitCredentials, GitSource
from datapin_operator.resolve.resolver import Resolved, Resolver

from testkit.dvcrepo import DvcUnavailable, make_dvc_repo, run_dvc, run_git
from testkit.gitrepo import GitHttpServer, git_recorder

USER, PASSWORD = "reader", "pa55-Very-Secret-9f2c"
GEN_CMD = "mkdir -p gen && echo generated > gen/out.txt"


@dataclass(frozen=True, kw_only=True)
class History:
    repo: Path
    commits: dict[str, str]  # c1..c4 -> sha
    tag_object: str  # sha of the annotated tag object v2 (not its commit)

    @property
    def url(self) -> str:
        return self.repo.as_uri()

    def show(self, commit: str, file: str) -> Any:
        return yaml.safe_load(run_git(self.repo, "show", f"{commit}:{file}").stdout)

    def pin(self, commit: str) -> str:
        """`data.dvc`'s pin at `commit`, read with git and YAML (not with the code under test)."""
        return str(self.show(commit, "data.dvc")["outs"][0]["md5"])


def _files(version: int) -> dict[str, bytes]:
    return {
        "a.txt": f"alpha {version}\n".encode(),
        "sub/b.bin": bytes(range(256)) * version,
        f"only-in-{version}.txt": b"x",
    }


def _commit(repo: Path, message: str) -> str:
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-q", "-m", message)
    return run_git(repo, "rev-parse", "HEAD").stdout.strip()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    try:
        fx = make_dvc_repo(tmp_path_factory.mktemp("resolve"), _files(1), version=3)
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC 3: {exc.reason}")
    repo, dvc = fx.repo, fx.dvc
    run_git(repo, "config", "uploadpack.allowFilter", "true")
    c1 = run_git(repo, "rev-parse", "HEAD").stdout.strip()
    run_git(repo, "tag", "v1")
    run_git(repo, "tag", "-a", "v1-annotated", "-m", "annotated v1")

    def write_data(version: int) -> None:
        for path in (repo / "data").rglob("*"):
            if path.is_file():
                path.unlink()
        for rel, data in _files(version).items():
            (repo / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / "data" / rel).write_bytes(data)
        run_dvc(dvc, repo, "add", "-q", "data")

    write_data(2)
    c2 = _commit(repo, "data v2")
    run_git(repo, "tag", "-a", "v2", "-m", "release v2")

    run_dvc(dvc, repo, "stage", "add", "-q", "-n", "gen", "-o", "gen", GEN_CMD)
    run_dvc(dvc, repo, "repro", "-q")
    (repo / "single.txt").write_text("one file\n")
    run_dvc(dvc, repo, "add", "-q", "single.txt")
    (repo / "legacy.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: old\n"
    )
    (repo / "multi.dvc").write_text(
        "outs:\n- md5: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir\n  hash: md5\n  path: a\n"
        "- md5: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.dir\n  hash: md5\n  path: b\n"
    )
    c3 = _commit(repo, "pipeline, a file out, a legacy out, two outs")

    run_git(repo, "checkout", "-q", "-b", "exp", c2)
    write_data(3)
    c4 = _commit(repo, "data v3 on exp")
    tag_object = run_git(repo, "rev-parse", "v2").stdout.strip()
    return History(
        repo=repo, commits={"c1": c1, "c2": c2, "c3": c3, "c4": c4}, tag_object=tag_object
    )


@pytest.fixture
def git(tmp_path: Path) -> GitSource:
    return GitSource(cache_dir=tmp_path / "git-cache", timeout=30)


def make_spec(
    repo: str | None,
    *,
    path: str = "data.dvc",
    revisions: dict[str, str] | None = None,
    layout: str = "auto",
) -> DatasetSpec:
    return DatasetSpec.model_validate(
        {
            "remote": {
                "url": "s3://bucket/store",
                "credentialsSecretRef": {"name": "keys"},
                "layout": layout,
            },
            "source": {"repo": repo, "path": path} if repo else None,
            "revisions": revisions or {},
        }
    )


async def no_secret(namespace: str, name: str) -> None:
    return None


async def resolve(git: GitSource, spec: DatasetSpec, revision: str, **kw: Any) -> Resolved:
    resolver = Resolver(git, secrets=no_secret)
    return await resolver.resolve(dataset="ds", spec=spec, revision=revision, **kw)


# -- git refs -------------------------------------------------------------------------------


@pytest.mark.dvc
@pytest.mark.parametrize(
    ("ref", "commit"),
    [
        ("v1", "c1"),
        ("v1-annotated", "c1"),
        ("v2", "c2"),
        ("refs/tags/v2", "c2"),
        ("exp", "c4"),
        ("main", "c3"),
        ("refs/heads/exp", "c4"),
        ("HEAD", "c4"),  # the origin's checked-out branch
        ("full:c1", "c1"),
        ("full:c4", "c4"),
        ("short:c2", "c2"),
        ("tagobject", "c2"),
    ],
)
async def test_git_refs_resolve_to_the_pin_data_dvc_has_at_their_commit(
    history: History, git: GitSource, ref: str, commit: str
) -> None:
    if ref.startswith("full:"):
        ref = history.commits[ref[5:]]
    elif ref.startswith("short:"):
        ref = history.commits[ref[6:]][:9]
    elif ref == "tagobject":
        ref = history.tag_object
    sha = history.commits[commit]

    got = await resolve(git, make_spec(history.url), ref)

    assert got == Resolved(ref=ref, pin=history.pin(sha), layout="dvc3", kind="git", commit=sha)


@pytest.mark.dvc
async def test_the_pins_of_the_history_differ(history: History) -> None:
    """Guards the test above: equal pins at every commit would let a wrong commit pass."""
    pins = {history.pin(history.commits[c]) for c in ("c1", "c2", "c4")}
    assert len(pins) == 3


@pytest.mark.dvc
async def test_plain_path_and_repeated_resolves(history: History, git: GitSource) -> None:
    spec = make_spec(str(history.repo))
    first = await resolve(git, spec, "v1")
    again = await resolve(git, spec, "v2")
    assert (first.pin, again.pin) == (
        history.pin(history.commits["c1"]),
        history.pin(history.commits["c2"]),
    )


@pytest.mark.dvc
async def test_dvc_lock_outputs_and_legacy_outs(history: History, git: GitSource) -> None:
    c3 = history.commits["c3"]
    lock = history.show(c3, "dvc.lock")
    gen_pin = next(o["md5"] for o in lock["stages"]["gen"]["outs"] if o["path"] == "gen")
    for target in ("gen", "dvc.lock:gen"):
        got = await resolve(git, make_spec(history.url, path=target), "main")
        assert (got.pin, got.layout, got.commit) == (gen_pin, "dvc3", c3)
    legacy = await resolve(git, make_spec(history.url, path="legacy.dvc"), "main")
    assert (legacy.pin, legacy.layout) == ("0123456789abcdef0123456789abcdef.dir", "legacy")
    # `data` means data.dvc when it exists, even though dvc.lock exists too.
    data = await resolve(git, make_spec(history.url, path="data"), "main")
    assert data.pin == history.pin(c3)
    picked = await resolve(git, make_spec(history.url, path="multi.dvc:b"), "main")
    assert picked.pin == "b" * 32 + ".dir"


# -- named and literal ----------------------------------------------------------------------


@pytest.mark.dvc
async def test_literal_and_named_revisions_need_no_git(history: History, git: GitSource) -> None:
    pin_v1 = history.pin(history.commits["c1"])
    # An unreachable source proves git is not asked: it would fail.
    spec = make_spec(
        "http://127.0.0.1:1/nothing.git",
        revisions={"golden": pin_v1, "v2": pin_v1},
        layout="legacy",
    )

    literal = await resolve(git, spec, f" {pin_v1.upper()} ")
    named = await resolve(git, spec, "golden")
    # A name that is also a git tag: the named revision wins (documented in resolve.py).
    shadowing = await resolve(git, spec, "v2")

    assert literal == Resolved(ref=pin_v1.upper(), pin=pin_v1, layout="legacy", kind="pin")
    assert named == Resolved(ref="golden", pin=pin_v1, layout="legacy", kind="named")
    assert shadowing == Resolved(ref="v2", pin=pin_v1, layout="legacy", kind="named")


async def test_without_a_source_an_unknown_revision_lists_the_names(git: GitSource) -> None:
    spec = make_spec(None, revisions={"golden": "c" * 32 + ".dir", "base": "d" * 32 + ".dir"})
    with pytest.raises(UnknownRevisionError) as err:
        await resolve(git, spec, "v1")
    message = str(err.value)
    assert "Dataset 'ds' revision 'v1'" in message
    assert "base, golden" in message
    assert "Fix:" in message
    assert "spec.source" in message
    assert (err.value.dataset, err.value.revision) == ("ds", "v1")

    with pytest.raises(UnknownRevisionError, match="looks like a DVC md5"):
        await resolve(git, spec, "e" * 32)
    with pytest.raises(UnknownRevisionError, match=r"empty.*Fix:"):
        await resolve(git, spec, "  ")


# -- moving tags ------------------------------------------------------------------------------


@pytest.fixture
def moving_tag(history: History) -> Iterator[str]:
    run_git(history.repo, "tag", "moving", history.commits["c1"])
    yield "moving"
    run_git(history.repo, "tag", "-d", "moving")


@pytest.mark.dvc
async def test_a_moved_tag_is_seen_after_the_ttl(
    history: History, moving_tag: str, tmp_path: Path
) -> None:
    """`ref_ttl` bounds how long a tag -> commit answer is reused. With 0 every resolve asks
    the server; with a long TTL the commit seen first is kept until the TTL passes (admitted
    Jobs keep their pins regardless: that is the lead's admission test)."""
    c1, c2 = history.commits["c1"], history.commits["c2"]
    now = [1000.0]
    fresh = GitSource(cache_dir=tmp_path / "fresh", ref_ttl=0)
    sticky = GitSource(cache_dir=tmp_path / "sticky", ref_ttl=300, clock=lambda: now[0])
    spec = make_spec(history.url)
    assert (await resolve(fresh, spec, moving_tag)).commit == c1
    assert (await resolve(sticky, spec, moving_tag)).commit == c1

    run_git(history.repo, "tag", "-f", moving_tag, c2)

    moved = await resolve(fresh, spec, moving_tag)
    assert (moved.commit, moved.pin) == (c2, history.pin(c2))
    kept = await resolve(sticky, spec, moving_tag)
    assert (kept.commit, kept.pin) == (c1, history.pin(c1))
    now[0] += 301
    later = await resolve(sticky, spec, moving_tag)
    assert (later.commit, later.pin) == (c2, history.pin(c2))


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.dvc
async def test_an_unknown_ref_lists_the_tags(history: History, git: GitSource) -> None:
    with pytest.raises(GitError) as err:
        await resolve(git, make_spec(history.url), "v9")
    message = str(err.value)
    assert "Dataset 'ds' revision 'v9'" in message
    assert "'v9' is not a tag, branch or commit" in message
    assert "tags: v1, v1-annotated, v2" in message
    assert "branches: exp, main" in message
    assert "Fix:" in message
    assert err.value.reason == "GitFailed"

    with pytest.raises(GitError, match=r"'deadbeef' is not a tag, branch or commit.*Fix:"):
        await resolve(git, make_spec(history.url), "deadbeef")
    with pytest.raises(GitError, match=r"commit 0{40} is not in .*Fix:"):
        await resolve(git, make_spec(history.url), "0" * 40)


@pytest.mark.parametrize(
    "url",
    [
        "file:///nonexistent/repo.git",
        "/nonexistent/repo",
        "http://127.0.0.1:1/repo.git",
        "http://someone:hunter2-secret@127.0.0.1:1/repo.git",
    ],
)
async def test_an_unreachable_repository(git: GitSource, url: str) -> None:
    with pytest.raises(GitError) as err:
        await resolve(git, make_spec(url), "v1")
    message = str(err.value)
    assert "cannot list the refs of" in message
    assert "Fix: check spec.source.repo" in message
    assert "hunter2" not in message
    assert "someone" not in message


async def test_refused_transports_and_option_like_urls(git: GitSource) -> None:
    with pytest.raises(GitError, match=r"transport 'ext'.*Fix:"):
        await resolve(git, make_spec("ext::sh%-c%touch%/tmp/pwned"), "v1")
    with pytest.raises(GitError, match=r"not a git URL.*Fix:"):
        await resolve(git, make_spec("--upload-pack=touch%/tmp/pwned"), "v1")
    with pytest.raises(GitError, match=r"cannot list the refs of https://\[::1\]:1/"):
        await resolve(git, make_spec("https://[::1]:1/repo.git"), "v1")  # "::" is no transport


@pytest.mark.dvc
@pytest.mark.parametrize(
    ("path", "ref", "expected"),
    [
        ("missing.dvc", "main", r"missing\.dvc does not exist at commit [0-9a-f]{12} .*Fix:"),
        ("gen", "v1", r"target 'gen' not found at commit .*no gen\.dvc and no dvc\.lock.*Fix:"),
        ("single.txt.dvc", "main", r"'single\.txt' .* is a single file .*not a directory.*Fix:"),
        ("single.txt", "main", r"is a single file"),
        ("dvc.lock:nope", "main", r"dvc\.lock at commit .* has no out 'nope'.*gen.*Fix:"),
        ("multi.dvc", "main", r"multi\.dvc at commit .* has 2 outs \(a, b\).*Fix:"),
        ("data.txt:x", "main", r"neither a \.dvc file nor dvc\.lock.*Fix:"),
        ("../outside.dvc", "main", r"not a path inside the repository.*Fix:"),
    ],
)
async def test_pin_read_errors_name_the_file_and_the_fix(
    history: History, git: GitSource, path: str, ref: str, expected: str
) -> None:
    with pytest.raises(PinReadError, match=expected) as err:
        await resolve(git, make_spec(history.url, path=path), ref)
    assert err.value.reason == "PinNotFound"
    assert str(err.value).startswith(f"Dataset 'ds' revision '{ref}': ")
    assert "dvcfile-" not in str(err.value)  # the temporary file is not what users know


async def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections in the kernel, never replies
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.git"
        git = GitSource(cache_dir=tmp_path / "cache", timeout=1.0)
        with pytest.raises(GitError, match=r"timed out after 1 s.*Fix:"):
            await resolve(git, make_spec(url), "v1")
        # The whole process group went: no git (or git-remote-http) still talks to it.
        assert not [pid for pid in _pids() if url in _cmdline(pid)]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


# -- credentials ------------------------------------------------------------------------------


@pytest.fixture
def http_server(history: History, tmp_path: Path) -> Iterator[GitHttpServer]:
    root = tmp_path / "srv"
    root.mkdir()
    run_git(root, "clone", "-q", "--bare", str(history.repo), str(root / "repo.git"))
    with GitHttpServer(root, username=USER, password=PASSWORD) as server:
        yield server


@pytest.mark.dvc
async def test_https_basic_auth_keeps_the_password_out_of_argv_and_errors(
    history: History, http_server: GitHttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, argv_log = git_recorder(tmp_path / "rec")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    git = GitSource(cache_dir=tmp_path / "cache", ref_ttl=60)
    spec = make_spec(http_server.url("repo.git"))
    right = GitCredentials.from_secret_data({"username": USER, "password": PASSWORD + "\n"})
    wrong = GitCredentials.from_secret_data({"username": USER, "password": "wrong-Pa55word"})

    with pytest.raises(GitError) as err:
        await resolve(git, spec, "v2", git_credentials=wrong)
    assert "authentication to http://127.0.0.1" in str(err.value)
    assert "Fix: check the Secret" in str(err.value)
    assert "wrong-Pa55word" not in str(err.value)
    assert "wrong-Pa55word" not in repr(err.value.__cause__ or "")

    got = await resolve(git, spec, "v2", git_credentials=right)
    c2 = history.commits["c2"]
    assert (got.commit, got.pin) == (c2, history.pin(c2))
    assert right.ssh_private_key is None

    # Answers cached for the right Secret are not handed to a caller without one.
    with pytest.raises(GitError, match="authentication to"):
        await resolve(git, spec, "v2")

    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert expected in http_server.seen  # the credentials did travel, in the header
    argv = argv_log.read_text()
    assert " ls-remote " in argv  # the recorder saw the calls
    assert PASSWORD not in argv
    assert expected.split()[1] not in argv


@pytest.mark.dvc
async def test_concurrent_resolves_of_one_repository_fetch_once(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, argv_log = git_recorder(tmp_path / "rec")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    git = GitSource(cache_dir=tmp_path / "cache")
    spec = make_spec(history.url)

    results = await asyncio.gather(*(resolve(git, spec, "v2") for _ in range(5)))

    c2 = history.commits["c2"]
    assert {(r.commit, r.pin) for r in results} == {(c2, history.pin(c2))}
    calls = argv_log.read_text().splitlines()
    assert len([c for c in calls if " fetch " in f" {c} "]) == 1, calls
    assert len([c for c in calls if " ls-remote " in f" {c} "]) == 1, calls


async def test_ssh_keys_go_through_a_private_file_that_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client: apt-get install -y openssh-client")
    bin_dir, ssh_log = git_recorder(tmp_path / "rec", tool="ssh")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    git = GitSource(cache_dir=cache, timeout=30)
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAfakeKeyMaterial\n"
    creds = GitCredentials.from_secret_data(
        {"ssh-privatekey": key, "known_hosts": "[127.0.0.1]:1 ssh-ed25519 AAAAC3Nza"}
    )

    with pytest.raises(GitError) as err:
        await resolve(git, make_spec("ssh://git@127.0.0.1:1/repo.git"), "v1", git_credentials=creds)

    assert "ssh://127.0.0.1:1/repo.git" in str(err.value)  # userinfo dropped from the URL
    assert "fakeKeyMaterial" not in str(err.value)
    argv = ssh_log.read_text()
    key_file = re.search(r"-i (\S+)", argv)
    assert key_file is not None, argv
    assert "IdentitiesOnly=yes" in argv
    assert "StrictHostKeyChecking=yes" in argv
    assert "fakeKeyMaterial" not in argv
    assert _existing(Path(key_file.group(1)), *(cache / "tmp").iterdir()) == []  # all deleted


def _existing(*paths: Path) -> list[Path]:
    return [p for p in paths if p.exists()]


def test_credentials_from_a_secret_never_show_their_values() -> None:
    creds = GitCredentials.from_secret_data(
        {"token": "ghp_abcdef123456\n", "ssh-privatekey": "KEYDATA", "known_hosts": "h ssh-ed25519"}
    )
    assert (creds.username, creds.password) == ("x-access-token", "ghp_abcdef123456")
    assert creds.ssh_private_key == "KEYDATA\n"  # OpenSSH rejects a key without a final newline
    shown = f"{creds!r} {creds}"
    assert "ghp_abcdef123456" not in shown
    assert "KEYDATA" not in shown
    assert "password=<set>" in shown
    assert GitCredentials.from_secret_data({"other": "x"}).is_empty
