"""A SeaweedFS S3 server with tenants: identities whose keys reach only their own bucket.

Why: the CSI node plugin's proof of access (`datapin_sidecar.csi.access`) must be tested the
way a shared cluster uses it, with each tenant's Secret holding keys that S3 itself refuses
for any other tenant's bucket. SeaweedFS scopes an identity's actions to a bucket when they
are written `Action:bucket` (`Read:tenant-a`, `List:tenant-a`, ...), so a wrong key is a real
403 from a real S3 implementation, not a mock.

`TenantSeaweed` is a `SeaweedServer` whose identity file also holds one identity per tenant
named at construction (its bucket is named after it and made when the server is up); the
server's own admin keys still reach everything (the fixtures use them to plant objects).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit.dvcremote import S3DvcFixture, push_dvc_fixture
from testkit.dvcrepo import DvcUnavailable
from testkit.seaweed import SeaweedServer

__all__ = ["Tenant", "TenantSeaweed"]


@dataclass(frozen=True, kw_only=True)
class Tenant:
    """One tenant: its bucket and the keys that read and write only that bucket."""

    name: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)


class TenantSeaweed(SeaweedServer):
    """`SeaweedServer` plus bucket-scoped identities, one per tenant (see the module doc)."""

    def __init__(self, workdir: Path, *, tenants: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.tenants = {
            name: Tenant(
                name=name,
                bucket=f"tenant-{name}-{secrets.token_hex(3)}",
                access_key="AK" + secrets.token_hex(9).upper(),
                secret_key="S" + secrets.token_urlsafe(30),
            )
            for name in tenants
        }

    def _prepare(self) -> None:
        super()._prepare()
        config = self.workdir / "s3.json"
        doc = json.loads(config.read_text(encoding="utf-8"))
        for t in self.tenants.values():
            doc["identities"].append(
                {
                    "name": f"tenant-{t.name}",
                    "credentials": [{"accessKey": t.access_key, "secretKey": t.secret_key}],
                    "actions": [f"{a}:{t.bucket}" for a in ("Read", "Write", "List")],
                }
            )
        config.write_text(json.dumps(doc), encoding="utf-8")

    def start(self) -> None:
        super().start()
        for t in self.tenants.values():
            self.make_bucket(t.bucket)


def push_for(
    server: TenantSeaweed,
    tenant: str,
    root: Path,
    *,
    version: int = 3,
    prefix: str = "dvcstore",
    files: Mapping[str, bytes] | None = None,
) -> S3DvcFixture:
    """`dvc push` (real DVC `version`) a repo under `root` to `tenant`'s bucket; the test is
    skipped, saying why, where that DVC is not installed."""
    try:
        return push_dvc_fixture(
            root,
            server,
            server.tenants[tenant].bucket,
            version=version,
            prefix=prefix,
            files=files,
            create_bucket=False,
        )
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC {version}: {exc.reason}")
