"""Shared pytest fixtures: real filesystems (XFS with reflinks, the root filesystem) and real DVC
repositories (DVC 3 and legacy DVC 2.58).

Design:

- Expensive things are session-scoped and built once: one 4G sparse reflink XFS volume
  (``xfs_mount``) and one repository per DVC version (``dvc3_fixture``, ``dvc2_fixture``).
  Tests get isolation from cheap function-scoped children: ``xfs_dir`` / ``rootfs_dir`` are fresh
  empty directories removed afterwards even if the test left read-only trees behind, and
  :func:`testkit.dvcrepo.dvc_checkout` clones rather than touching the shared repo.
- ``fs_dir`` is parametrised over ``xfs`` and ``rootfs``, so a test written once runs on a
  reflink filesystem and on one without reflinks (ext4 here), covering both link strategies.
- ``small_xfs`` is a fresh 320M volume per test, for ENOSPC behaviour that must not leak into
  other tests.
- S3: one SeaweedFS server per session (``seaweed``); isolation comes from a fresh bucket per
  test (``s3_bucket``, deleted afterwards, which also returns its volume slots to the server) and
  a fresh :class:`~testkit.faultproxy.FaultProxy` per test (``fault_proxy``), so no rule or
  counter leaks between tests. The DVC push fixtures (``dvc3_s3``, ``dvc2_s3``) are session-wide,
  each in its own bucket, and must be treated as read-only.
- Tests that use these fixtures are marked automatically with the ``xfs`` / ``dvc`` / ``s3``
  markers declared in pyproject (``fs_dir`` only for its ``xfs`` variant), so ``-m "not xfs"``
  selects the rest explicitly. Markers only select; they never skip.
- When the machine lacks something (root, xfsprogs, loop devices, the DVC executables, ``weed``),
  the fixture calls ``pytest.skip`` with the reason and the fix; ``-ra`` in pyproject prints it.
  Nothing else is skipped or hidden.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import pytest

from testkit import rmtree_robust
from testkit.dvcremote import S3DvcFixture, push_dvc_fixture
from testkit.dvcrepo import DvcFixture, DvcUnavailable, make_dvc_repo, sample_files
from testkit.faultproxy import FaultProxy
from testkit.prometheus import (
    PrometheusServer,
    PrometheusUnavailable,
    find_prometheus,
    find_promtool,
)
from testkit.seaweed import SeaweedServer, SeaweedUnavailable, find_weed
from testkit.xfs import MIN_XFS_SIZE, XfsUnavailable, xfs_volume

REPO_ROOT = Path(__file__).resolve().parents[1]

_XFS_FIXTURES = frozenset({"xfs_mount", "xfs_dir", "small_xfs"})
_DVC_FIXTURES = frozenset({"dvc3_fixture", "dvc2_fixture", "dvc3_s3", "dvc2_s3", "dvc3_revisions"})
_PROMETHEUS_FIXTURES = frozenset({"prometheus", "promtool"})
_S3_FIXTURES = frozenset(
    {"seaweed", "s3_bucket", "fault_proxy", "dvc3_s3", "dvc2_s3", "dvc3_revisions"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Add the ``xfs`` / ``dvc`` / ``s3`` markers to tests that (statically) request those
    fixtures.
    """
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if names & _XFS_FIXTURES or params.get("fs_dir") == "xfs":
            item.add_marker(pytest.mark.xfs)
        if names & _DVC_FIXTURES:
            item.add_marker(pytest.mark.dvc)
        if names & _S3_FIXTURES:
            item.add_marker(pytest.mark.s3)
        if names & _PROMETHEUS_FIXTURES:
            item.add_marker(pytest.mark.prometheus)


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Mountpoint of a session-wide 4G (sparse) XFS volume with ``reflink=1``."""
    workdir = tmp_path_factory.mktemp("xfs-session")
    try:
        with xfs_volume("4G", workdir=workdir, reflink=True) as mnt:
            yield mnt
    except XfsUnavailable as exc:
        pytest.skip(f"no XFS volume: {exc.reason}")


@pytest.fixture
def xfs_dir(xfs_mount: Path) -> Iterator[Path]:
    """A fresh empty directory on the shared reflink XFS volume, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="t-", dir=xfs_mount))
    try:
        yield path
    finally:
        rmtree_robust(path)


def _rootfs_base(tmp_path: Path) -> Path:
    """A writable directory on the root filesystem: pytest's tmp_path if it is (not tmpfs)."""
    root_dev = os.stat("/").st_dev
    for candidate in (tmp_path, Path("/var/tmp"), REPO_ROOT.parent):
        try:
            if candidate.is_dir() and os.stat(candidate).st_dev == root_dev:
                return candidate
        except OSError:
            continue
    pytest.skip(
        f"no writable directory on the root filesystem among {tmp_path}, /var/tmp, "
        f"{REPO_ROOT.parent}: run with --basetemp=<dir on the root fs>"
    )


@pytest.fixture
def rootfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh empty directory on the root filesystem (ext4 here: no reflinks), removed after."""
    path = Path(tempfile.mkdtemp(prefix="rootfs-", dir=_rootfs_base(tmp_path)))
    try:
        yield path
    finally:
        rmtree_robust(path)


@pytest.fixture(params=["xfs", "rootfs"], ids=["xfs", "rootfs"])
def fs_dir(request: pytest.FixtureRequest) -> Path:
    """A fresh directory on XFS-with-reflink, then on the root filesystem: one test, both."""
    name = "xfs_dir" if request.param == "xfs" else "rootfs_dir"
    path: Path = request.getfixturevalue(name)
    return path


@pytest.fixture
def small_xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Mountpoint of a fresh 320M reflink XFS volume (~250 MiB free), for ENOSPC tests."""
    workdir = tmp_path_factory.mktemp("xfs-small")
    try:
        with xfs_volume(MIN_XFS_SIZE, workdir=workdir, reflink=True) as mnt:
            yield mnt
    except XfsUnavailable as exc:
        pytest.skip(f"no XFS volume: {exc.reason}")


def _dvc_fixture(tmp_path_factory: pytest.TempPathFactory, version: int) -> DvcFixture:
    try:
        return make_dvc_repo(
            tmp_path_factory.mktemp(f"dvc{version}"), sample_files(), version=version
        )
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC {version}: {exc.reason}")


@pytest.fixture(scope="session")
def dvc3_fixture(tmp_path_factory: pytest.TempPathFactory) -> DvcFixture:
    """A git+DVC 3 repo tracking ``sample_files()`` as ``data/``, pushed to a directory remote."""
    return _dvc_fixture(tmp_path_factory, 3)


@pytest.fixture(scope="session")
def dvc2_fixture(tmp_path_factory: pytest.TempPathFactory) -> DvcFixture:
    """Same with DVC 2.58: legacy layout, ``md5-dos2unix`` object names."""
    return _dvc_fixture(tmp_path_factory, 2)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """The session's SeaweedFS S3 server on 127.0.0.1 (random keys), stopped by PID at the end."""
    try:
        weed = find_weed()
    except SeaweedUnavailable as exc:
        pytest.skip(f"no SeaweedFS S3 server: {exc.reason}")
    with SeaweedServer(tmp_path_factory.mktemp("seaweed"), weed=weed) as server:
        yield server


def _bucket_name(hint: str) -> str:
    """A valid, unique S3 bucket name that says which test made it."""
    base = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-")
    return f"{base or 't'}-{secrets.token_hex(4)}"


@pytest.fixture
def s3_bucket(seaweed: SeaweedServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """Name of a fresh empty bucket on ``seaweed``, deleted with its contents afterwards."""
    name = seaweed.make_bucket(_bucket_name(request.node.name))
    yield name
    try:
        seaweed.delete_bucket(name)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise  # the test may delete it itself; anything else is a real failure


@pytest.fixture
def fault_proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    """A fresh :class:`FaultProxy` in front of ``seaweed`` (no rules), closed afterwards."""
    with FaultProxy(seaweed.endpoint) as proxy:
        yield proxy


def _dvc_s3(
    tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer, version: int
) -> S3DvcFixture:
    try:
        return push_dvc_fixture(
            tmp_path_factory.mktemp(f"dvc{version}-s3"),
            seaweed,
            _bucket_name(f"dvc{version}-push"),
            version=version,
        )
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC {version}: {exc.reason}")


@pytest.fixture(scope="session")
def dvc3_s3(tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer) -> S3DvcFixture:
    """``sample_files()`` pushed by real DVC 3 to ``s3://<own bucket>/dvcstore`` on ``seaweed``
    (``files/md5/`` layout). Read-only: it is shared by the session.
    """
    return _dvc_s3(tmp_path_factory, seaweed, 3)


@pytest.fixture(scope="session")
def dvc2_s3(tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer) -> S3DvcFixture:
    """Same with DVC 2.58: legacy layout, ``md5-dos2unix`` object names. Read-only."""
    return _dvc_s3(tmp_path_factory, seaweed, 2)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """The session's Prometheus on 127.0.0.1 (1 s scrapes, targets added with ``add_target``),
    stopped by PID at the end. Tests share it: give each target a unique ``job`` and ``node``
    label, and remove the target afterwards.
    """
    try:
        binary = find_prometheus()
    except PrometheusUnavailable as exc:
        pytest.skip(f"no Prometheus: {exc.reason}")
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), binary=binary) as server:
        yield server


@pytest.fixture(scope="session")
def promtool() -> Path:
    """The ``promtool`` executable (from the prometheus package)."""
    try:
        return find_promtool()
    except PrometheusUnavailable as exc:
        pytest.skip(f"no promtool: {exc.reason}")


def _revision_a_files() -> dict[str, bytes]:
    rng = random.Random(1)
    return {f"d{i % 12}/f{i:04d}.bin": rng.randbytes(rng.randint(1, 12_000)) for i in range(240)}


def _revision_b_files(a: dict[str, bytes]) -> dict[str, bytes]:
    """Half of A's files changed, 20 removed, 20 added: a reader seeing a mix would notice."""
    rng = random.Random(7)
    b = {k: (rng.randbytes(len(v) + 1) if i % 2 else v) for i, (k, v) in enumerate(a.items())}
    for k in list(b)[:20]:
        del b[k]
    b.update({f"new/g{i}.bin": rng.randbytes(3000) for i in range(20)})
    return b


@pytest.fixture(scope="session")
def dvc3_revisions(
    tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer
) -> tuple[S3DvcFixture, S3DvcFixture]:
    """Revisions A and B of one dataset (240 files; B changes half), each pushed by real DVC 3
    to ``s3://<one bucket>/dvcstore`` on ``seaweed``. Read-only: shared by the session.
    """
    bucket = _bucket_name("two-revisions")
    a_files = _revision_a_files()
    try:
        a = push_dvc_fixture(
            tmp_path_factory.mktemp("rev-a"), seaweed, bucket, version=3, files=a_files
        )
        b = push_dvc_fixture(
            tmp_path_factory.mktemp("rev-b"),
            seaweed,
            bucket,
            version=3,
            files=_revision_b_files(a_files),
            create_bucket=False,
        )
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC 3: {exc.reason}")
    return a, b
