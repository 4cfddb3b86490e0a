"""Real DVC repositories pushed with real ``dvc push`` to an S3 remote (SeaweedFS), the way the
Backblaze B2 + DVC tutorial sets one up.

Why: the S3 fetcher reads what DVC's S3 backend (dvc-s3 on s3fs/aiobotocore) wrote - its key
layout under the remote URL's prefix, for DVC 3 and for the legacy DVC 2 layout - not what we
think it writes. So the bucket contents come from the real ``dvc push`` of DVC 3 (dvc-s3 3.x,
``.tools/dvc3``) and DVC 2.58 (dvc-s3 2.22, ``.tools/dvc2``).

Design:

- :func:`push_dvc_fixture` builds the repository with :func:`testkit.dvcrepo.make_dvc_repo`
  (git + DVC, dataset added and committed, also pushed to its directory remote), then configures
  the S3 remote exactly as the tutorial does: ``dvc remote add -d b2 s3://BUCKET/PREFIX``,
  ``dvc remote modify b2 endpointurl ...`` (committed: it is shared project config) and the keys
  with ``dvc remote modify --local`` (so they land in the git-ignored ``.dvc/config.local``), and
  runs ``dvc push``.
- DVC runs in :func:`testkit.dvcrepo.hermetic_env` plus an AWS environment that cannot
  leak the machine's: no ``AWS_*`` variables from outside, no shared config or credentials files,
  the EC2 metadata probe off (it would wait on an off-machine address), and checksums
  ``when_required``: newer botocore otherwise sends the CRC headers B2 rejects.
- After the push the bucket is listed with botocore and checked: the ``.dir`` object *and* every
  object the ``.dir`` names must be at the layout's path (DVC 3: ``PREFIX/files/md5/ab/cd...``;
  legacy: ``PREFIX/ab/cd...``), else the fixture fails with the listing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from testkit.dvcrepo import (
    DvcFixture,
    hermetic_env,
    make_dvc_repo,
    object_path,
    run_git,
    sample_files,
)
from testkit.procs import run
from testkit.seaweed import SeaweedServer

__all__ = ["S3DvcFixture", "dvc_s3_env", "object_key", "push_dvc_fixture"]

_TIMEOUT = 300.0


@dataclass(frozen=True, kw_only=True)
class S3DvcFixture:
    """A real DVC repository whose dataset real ``dvc push`` put into an S3 bucket."""

    dvc: DvcFixture
    """The repository (``repo``, ``files``, ``rev``...), its default remote now the S3 one."""
    bucket: str
    prefix: str
    """Key prefix of the remote inside the bucket, without slashes at either end."""
    endpoint: str
    """``http://127.0.0.1:PORT`` the push went to (the SeaweedFS server)."""
    remote_name: str
    """The DVC remote's name (``b2``, as in the tutorial)."""
    remote_url: str
    """``s3://BUCKET/PREFIX``, as in ``.dvc/config``."""
    layout: str
    """``dvc3`` (``PREFIX/files/md5/<2>/<30>``) or ``legacy`` (``PREFIX/<2>/<30>``)."""
    keys: tuple[str, ...]
    """Every key under ``PREFIX/`` in the bucket after the push, sorted."""
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def rev(self) -> str:
        """The ``<md5>.dir`` of the dataset, as in the ``.dvc`` file."""
        return self.dvc.rev

    @property
    def files(self) -> dict[str, bytes]:
        return self.dvc.files

    @property
    def dir_key(self) -> str:
        """Key of the ``.dir`` object in the bucket."""
        return self.key(self.rev)

    def key(self, md5: str) -> str:
        """Key of object ``md5`` (may end in ``.dir``) under this remote's layout."""
        return object_key(self.prefix, md5, layout=self.layout)


def object_key(prefix: str, md5: str, *, layout: str) -> str:
    """Where a DVC S3 remote at ``s3://BUCKET/PREFIX`` keeps object ``md5``."""
    if layout not in ("dvc3", "legacy"):
        raise ValueError(f"layout must be 'dvc3' or 'legacy', not {layout!r}")
    base = f"{prefix}/files/md5" if layout == "dvc3" else prefix
    return f"{base.lstrip('/')}/{md5[:2]}/{md5[2:]}"


def dvc_s3_env(repo: Path, *, private: Path | None = None, who: str = "tests") -> dict[str, str]:
    """Environment for DVC against a local S3 endpoint: hermetic, no ambient AWS settings.

    DVC's private state goes to ``private`` (default ``repo/.dvc/tmp``; the demo passes its own
    directory, since it runs DVC before ``repo/.dvc`` exists); ``who`` names the git identity.
    """
    private = repo / ".dvc" / "tmp" if private is None else private
    env = {k: v for k, v in hermetic_env(private, who=who).items() if not k.startswith("AWS_")}
    # An empty regular file: botocore refuses /dev/null ("config file could not be found").
    empty = private / "aws-empty-config"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.touch()
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
        AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
    )
    return env


def push_dvc_fixture(
    root: Path,
    server: SeaweedServer,
    bucket: str,
    *,
    version: int,
    prefix: str = "dvcstore",
    files: Mapping[str, bytes] | None = None,
    remote_name: str = "b2",
    endpoint: str | None = None,
    create_bucket: bool = True,
) -> S3DvcFixture:
    """Build a DVC ``version`` (3 or 2) repo under ``root`` and ``dvc push`` it to
    ``s3://bucket/prefix`` on ``server`` (or via ``endpoint``, e.g. a proxy in front of it).

    Raises :class:`testkit.dvcrepo.DvcUnavailable` when that DVC is missing, and
    ``RuntimeError`` (with the bucket listing) when the pushed layout is not what it should be.
    """
    prefix = prefix.strip("/")
    endpoint = endpoint or server.endpoint
    fx = make_dvc_repo(root, sample_files() if files is None else files, version=version)
    if create_bucket:
        server.make_bucket(bucket)

    env = dvc_s3_env(fx.repo)

    def dvc(*args: str) -> None:
        run([fx.dvc, *args], cwd=fx.repo, env=env, timeout=_TIMEOUT)

    remote_url = f"s3://{bucket}/{prefix}"
    dvc("remote", "add", "-d", remote_name, remote_url)
    dvc("remote", "modify", remote_name, "endpointurl", endpoint)
    dvc("remote", "modify", "--local", remote_name, "access_key_id", server.access_key)
    dvc("remote", "modify", "--local", remote_name, "secret_access_key", server.secret_key)
    run_git(fx.repo, "add", ".dvc/config")
    run_git(fx.repo, "commit", "-q", "-m", f"dvc remote {remote_name}: {remote_url}")
    dvc("push")

    layout = "dvc3" if version >= 3 else "legacy"
    keys = tuple(server.keys(bucket, prefix + "/"))
    entries = json.loads(object_path(fx.cache, fx.rev, version=version).read_bytes())
    expected = {object_key(prefix, fx.rev, layout=layout)}
    expected |= {object_key(prefix, e["md5"], layout=layout) for e in entries}
    missing = sorted(expected - set(keys))
    if missing:
        listing = "\n".join(keys) or "(nothing)"
        raise RuntimeError(
            f"after `dvc push` (DVC {version}, {layout} layout) s3://{bucket} lacks "
            f"{len(missing)} expected keys, e.g. {missing[:3]}; it holds:\n{listing}"
        )
    return S3DvcFixture(
        dvc=fx,
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint,
        remote_name=remote_name,
        remote_url=remote_url,
        layout=layout,
        keys=keys,
        access_key=server.access_key,
        secret_key=server.secret_key,
        region=server.region,
    )
