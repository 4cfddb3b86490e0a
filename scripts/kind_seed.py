"""Seed an S3 remote with a dataset pushed by real DVC, for the kind end-to-end test.

Run from the repository root (scripts/kind-e2e does, with the in-cluster SeaweedFS
port-forwarded to 127.0.0.1)::

    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... python3 -m scripts.kind_seed \\
        --endpoint http://127.0.0.1:PORT --bucket datapin-e2e --prefix dvcstore --out DIR

It prints, on stdout and nothing else, shell assignments the caller evaluates::

    PIN=<md5>.dir                   the pushed directory, as in the repository's data.dvc
    FILES=DIR/files.json            {"relative/path": "<md5>", ...}: every file of it
    REMOTE=s3://BUCKET/PREFIX

Design, and why:

- The bucket is filled by the real `dvc push` of the project's DVC 3 (`.tools/dvc3`, made by
  scripts/setup), configured as the Backblaze B2 tutorial does (`dvc remote add -d`,
  `endpointurl`): the e2e test must prove datapin reads what DVC writes, not what we believe
  it writes. The repository is built by :func:`testkit.dvcrepo.make_dvc_repo`, the same
  helper the rest of the suite trusts.
- The keys come from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), are
  handed to DVC through its environment (never `dvc remote modify ... secret_access_key`,
  which would put the secret in an argument list and in .dvc/config.local) and appear in no
  message. Everything else in DVC's environment is hermetic (no ambient AWS config, no
  metadata probe, checksums "when_required" as B2 needs).
- The dataset is deterministic (seeded bytes): every run pushes the same objects, so the pin
  is stable and a re-run against a seeded bucket is cheap. It is small (about 3 MiB) but has
  what trips naive readers: nested directories, a name with a space, an empty file, and two
  files with identical bytes (one object, two entries).
- Nothing is trusted blindly: after the push the bucket is listed and must hold the `.dir`
  object and every object it names under the DVC 3 layout (`PREFIX/files/md5/ab/cdef...`);
  files.json is the `.dir`'s own entries, cross-checked against the md5 of the bytes written.
- The endpoint may have just been port-forwarded: connecting is retried for `--wait` seconds.

Exit status: 0 seeded; 2 unusable invocation (missing keys, DVC missing, non-empty --out);
1 anything else (S3 refused, push failed, layout wrong), with a message naming the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import botocore.config
import botocore.exceptions
import botocore.session

from testkit.dvcremote import dvc_s3_env, object_key
from testkit.dvcrepo import (
    DvcUnavailable,
    make_dvc_repo,
    object_path,
    run_git,
)
from testkit.procs import CommandError, run

KEY_VARS: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
REMOTE_NAME: Final = "b2"
_PUSH_TIMEOUT: Final = 600.0
_T = TypeVar("_T")


class SeedError(RuntimeError):
    """Seeding failed; the message names what and how to fix it. `status` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def dataset() -> dict[str, bytes]:
    """The e2e dataset: deterministic bytes, about 3 MiB, in nested directories."""
    rng = random.Random(20240606)  # noqa: S311 - reproducible test bytes, not secrets
    labels = "".join(f"{i},{rng.randint(0, 9)}\n" for i in range(2000)).encode()
    shared = rng.randbytes(64 * 1024)
    return {
        "README.md": b"# datapin e2e dataset\n\nPushed by scripts/kind_seed.py with real DVC.\n",
        "train/shard-000.bin": rng.randbytes(1024 * 1024),
        "train/shard-001.bin": rng.randbytes(1024 * 1024),
        "train/labels.csv": b"id,label\n" + labels,
        "val/images/cat 001.raw": rng.randbytes(384 * 1024),
        "val/images/dog-002.raw": rng.randbytes(256 * 1024),
        "val/images/copy-of-shared.raw": shared,
        "val/shared.raw": shared,
        "meta/deep/nested/classes.json": json.dumps({"0": "cat", "1": "dog"}).encode(),
        "meta/empty.txt": b"",
    }


def s3_client(endpoint: str, region: str) -> Any:
    """A botocore S3 client with the keys from the environment (SigV4, path style, and
    checksums only when required: B2 rejects the newer default checksum headers)."""
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=os.environ[KEY_VARS[0]],
        aws_secret_access_key=os.environ[KEY_VARS[1]],
        config=botocore.config.Config(
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


def _retrying(what: str, call: Callable[[], _T], *, wait: float) -> _T:
    """`call()`, retried while the endpoint does not answer (a fresh port-forward)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return call()
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ReadTimeoutError,
        ) as exc:
            if time.monotonic() >= deadline:
                raise SeedError(
                    f"{what}: no answer from the S3 endpoint within {wait:.0f} s ({exc}). "
                    "Fix: check that the endpoint URL is right and the server (or the "
                    "`kubectl port-forward` to it) is running"
                ) from None
            time.sleep(1.0)


def ensure_bucket(client: Any, bucket: str, endpoint: str, *, wait: float) -> bool:
    """Create `bucket` unless it exists; True if it was created."""

    def head() -> int:
        try:
            client.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return 200

    status = _retrying(f"HEAD bucket {bucket}", head, wait=wait)
    if status == 200:
        return False
    if status in {401, 403}:
        raise SeedError(
            f"the S3 endpoint {endpoint} refused the keys in {' / '.join(KEY_VARS)} for bucket "
            f"{bucket} (HTTP {status}). Fix: export the keys the server was configured with"
        )
    if status != 404:
        raise SeedError(
            f"HEAD bucket {bucket} on {endpoint} answered HTTP {status}. Fix: check the "
            "endpoint is an S3 API endpoint and the bucket name is valid"
        )
    try:
        _retrying(f"create bucket {bucket}", lambda: client.create_bucket(Bucket=bucket), wait=wait)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise SeedError(
                f"cannot create bucket {bucket} on {endpoint}: {code or exc}. Fix: create it "
                "yourself or use keys allowed to create buckets"
            ) from None
        return False
    return True


def list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under `prefix` in `bucket`, sorted (all ListObjectsV2 pages)."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", ()))
    return sorted(keys)


def seed(
    *, endpoint: str, bucket: str, prefix: str, out: Path, region: str, wait: float
) -> tuple[str, Path]:
    """Push the dataset to s3://bucket/prefix on `endpoint`; return (pin, files.json path)."""
    missing = [name for name in KEY_VARS if not os.environ.get(name)]
    if missing:
        raise SeedError(
            f"{' and '.join(missing)} not set. Fix: export the S3 keys in the environment "
            "(they are never taken as arguments)",
            status=2,
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SeedError(f"--out {out} exists and is not an empty directory. Fix: pass a new one", 2)
    prefix = prefix.strip("/")
    client = s3_client(endpoint, region)
    created = ensure_bucket(client, bucket, endpoint, wait=wait)
    _say(f"bucket {bucket}: {'created' if created else 'exists'} on {endpoint}")

    files = dataset()
    try:
        fx = make_dvc_repo(out, files, version=3)
    except DvcUnavailable as exc:
        raise SeedError(f"no DVC 3: {exc.reason}", status=2) from None
    _say(f"dvc add: {len(files)} files in {fx.repo}, pin {fx.rev}")

    env = dvc_s3_env(fx.repo)
    env.update({name: os.environ[name] for name in KEY_VARS}, AWS_DEFAULT_REGION=region)

    def dvc(*args: str) -> None:
        run([fx.dvc, *args], cwd=fx.repo, env=env, timeout=_PUSH_TIMEOUT)

    remote_url = f"s3://{bucket}/{prefix}"
    dvc("remote", "add", "-d", REMOTE_NAME, remote_url)
    dvc("remote", "modify", REMOTE_NAME, "endpointurl", endpoint)
    run_git(fx.repo, "add", ".dvc/config")
    run_git(fx.repo, "commit", "-q", "-m", f"dvc remote {REMOTE_NAME}: {remote_url}")
    dvc("push", "-r", REMOTE_NAME)
    _say(f"dvc push: {remote_url}")

    raw = object_path(fx.cache, fx.rev, version=3).read_bytes()
    entries: list[dict[str, str]] = json.loads(raw)
    manifest = {e["relpath"]: e["md5"] for e in entries}
    wrong = sorted(
        rel
        for rel, data in files.items()
        if manifest.get(rel) != hashlib.md5(data, usedforsecurity=False).hexdigest()
    )
    if wrong or set(manifest) != set(files):
        raise SeedError(f"DVC's .dir object {fx.rev} does not list the files written: {wrong}")

    keys = set(list_keys(client, bucket, prefix + "/"))
    expected = {object_key(prefix, fx.rev, layout="dvc3")}
    expected |= {object_key(prefix, md5, layout="dvc3") for md5 in manifest.values()}
    absent = sorted(expected - keys)
    if absent:
        raise SeedError(
            f"after `dvc push`, s3://{bucket} lacks {len(absent)} of the {len(expected)} "
            f"objects of {fx.rev} under the DVC 3 layout, e.g. {absent[:3]}. Fix: check that "
            "the endpoint is the server the cluster reads from and that it kept the writes"
        )

    files_json = out / "files.json"
    files_json.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return fx.rev, files_json


def _say(message: str) -> None:
    print(f"kind_seed: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m scripts.kind_seed",
        description="Push a small dataset with real DVC 3 to an S3 remote; print PIN= and FILES=.",
        epilog="Keys: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment.",
    )
    parser.add_argument("--endpoint", required=True, help="S3 endpoint URL (http://HOST:PORT)")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="dvcstore", help="key prefix of the DVC remote")
    parser.add_argument("--out", required=True, type=Path, help="new or empty work directory")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for S3")
    args = parser.parse_args(argv)
    try:
        pin, files_json = seed(
            endpoint=args.endpoint,
            bucket=args.bucket,
            prefix=args.prefix,
            out=args.out.resolve(),
            region=args.region,
            wait=args.wait,
        )
    except SeedError as exc:
        print(f"kind_seed: error: {exc}", file=sys.stderr)
        return exc.status
    except CommandError as exc:
        print(f"kind_seed: error: {exc}\nFix: see DVC's output above", file=sys.stderr)
        return 1
    remote = f"s3://{args.bucket}/{args.prefix.strip('/')}"
    for name, value in (("PIN", pin), ("FILES", str(files_json)), ("REMOTE", remote)):
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
