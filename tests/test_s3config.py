"""Where an S3/B2 DVC remote is and which keys read it: `datapin_sidecar.remotes.s3config`.

* `RemoteConfig`: URL and bucket validation, region derivation (B2 and AWS endpoints),
  path/virtual addressing, and object URLs encoded exactly as botocore (the reference signer)
  encodes them.
* `read_dvc_remote` against configs written by the real DVC 3 and DVC 2.58 (`dvc remote add`,
  `dvc remote modify [--local]`), plus hand-written configs for what DVC never writes but
  people do (both section quote styles, comments, odd indentation, broken files).
* Credential sources: the environment, a Secret volume rotated exactly as kubelet does it
  (timestamped directory, `..data` symlink renamed over), dotenv files, chains.
* Secrets never show: every error path is driven with a known secret, which must not appear
  in the message, the repr, the formatted traceback or the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from datapin_sidecar.errors import NoCredentialsError, UsageError
from datapin_sidecar.remotes.credentials import (
    ChainCredentials,
    Credentials,
    CredentialSource,
    EnvCredentials,
    SecretDirCredentials,
    StaticCredentials,
    credentials_from_env_file,
    read_env_file,
)
from datapin_sidecar.remotes.dvcconfig import read_dvc_remote
from datapin_sidecar.remotes.endpoint import Addressing, RemoteConfig
from datapin_sidecar.remotes.secretkeys import DEFAULT_ID_KEYS, DEFAULT_SECRET_KEYS

from testkit.dvcrepo import DvcUnavailable, find_dvc, run_dvc, run_git
from testkit.k8svolume import kubelet_update

#: A secret that must never appear in any message, repr, traceback or log line.
CANARY = "SUPERSECRET123"
KEY_ID = "0025a1b2c3d4e5f0000000001"
APP_KEY = "K002abcdefghijklmnopqrstuvwxyz0"
ROTATED = "K002rotatedrotatedrotated"
SESSION = "FwoGZXIvYXdzEJr"
B2 = "https://s3.us-west-002.backblazeb2.com"


def creds(key_id: str = KEY_ID, secret: str = APP_KEY, token: str | None = None) -> Credentials:
    return Credentials(access_key_id=key_id, secret_access_key=secret, session_token=token)


# --------------------------------------------------------------------------------------------
# RemoteConfig: URLs, buckets, endpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normal", "bucket", "prefix"),
    [
        ("s3://my-bucket/dvcstore", "s3://my-bucket/dvcstore", "my-bucket", "dvcstore"),
        ("s3://my-bucket/dvcstore/", "s3://my-bucket/dvcstore", "my-bucket", "dvcstore"),
        ("s3://my-bucket/a/b/c/", "s3://my-bucket/a/b/c", "my-bucket", "a/b/c"),
        ("s3://my-bucket", "s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "s3://my-bucket", "my-bucket", ""),
        ("S3://my-bucket/p", "s3://my-bucket/p", "my-bucket", "p"),
        ("  s3://my-bucket/p  ", "s3://my-bucket/p", "my-bucket", "p"),
        ("s3://my.bucket.1/données", "s3://my.bucket.1/données", "my.bucket.1", "données"),
    ],
)
def test_url_is_normalised(url: str, normal: str, bucket: str, prefix: str) -> None:
    config = RemoteConfig.from_url(url, endpoint_url=B2)
    assert (config.url, config.bucket, config.prefix) == (normal, bucket, prefix)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("gs://my-bucket/p", "uses gs://"),
        ("s3a://my-bucket/p", "uses s3a://"),
        ("https://my-bucket.s3.amazonaws.com/p", "uses https://"),
        ("azure://container/p", "uses azure://"),
        ("/srv/dvc-store", "is not a URL"),
        ("my-bucket/prefix", "not a URL"),
        ("", "empty"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://my-bucket:9000/p", "endpoint URL (https://host:port)"),
        ("s3://my-bucket/p?versionId=3", "query or fragment"),
        ("s3://my-bucket/p#frag", "query or fragment"),
        ("s3://my-bucket/a//b", "empty, '.' or '..' path segment"),
        ("s3://my-bucket/a/../b", "empty, '.' or '..' path segment"),
        ("s3://ab/p", "it has 2 characters (3 to 63 are allowed)"),
        (f"s3://{'a' * 64}/p", "it has 64 characters"),
        ("s3://-bucket/p", "begin and end with a letter or digit"),
        ("s3://bucket./p", "begin and end with a letter or digit"),
        ("s3://my..bucket/p", "two dots"),
        ("s3://my-.bucket/p", "a dot and a hyphen"),
        ("s3://192.168.10.1/p", "formatted as an IP address"),
        ("s3://my bucket/p", "contains ' '"),
        ("s3://my!bucket*/p", "contains '!', '*'"),
        ("s3://bücket/p", "contains 'ü'"),
    ],
)
def test_invalid_urls_name_the_problem_and_the_fix(url: str, says: str) -> None:
    with pytest.raises(UsageError) as info:
        RemoteConfig.from_url(url)
    message = str(info.value)
    assert says in message
    assert "Fix:" in message
    assert "s3://" in message  # every fix shows the form to write


def test_legacy_bucket_names_are_accepted_and_use_path_style() -> None:
    """B2 allows mixed case, old us-east-1 buckets have underscores: not host names."""
    for bucket in ("MyBucket", "my_bucket"):
        config = RemoteConfig.from_url(f"s3://{bucket}/p", endpoint_url=B2)
        assert config.bucket == bucket
        assert config.resolved_addressing is Addressing.PATH
        assert config.object_url(config.key("x")) == f"{B2}/{bucket}/p/x"


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("s3.us-west-002.backblazeb2.com", "'https://s3.us-west-002.backblazeb2.com'"),
        ("ftp://s3.example.com", "uses ftp://"),
        ("s3://s3.example.com", "uses s3://"),
        ("https://s3.example.com/my-bucket", "has a path (/my-bucket)"),
        ("https://s3.example.com/?x=1", "query or fragment"),
        ("https://s3.example.com#x", "query or fragment"),
        ("https://s3.example.com:99999", "bad port"),
        ("https://s3.example.com:0", "port 0"),
        ("https://", "no host"),
        ("https://s3 example.com", "not a valid host name"),
        ("http://[::1", "not a valid URL"),
    ],
)
def test_invalid_endpoints_name_the_problem_and_the_fix(endpoint: str, says: str) -> None:
    with pytest.raises(UsageError) as info:
        RemoteConfig.from_url("s3://my-bucket/p", endpoint_url=endpoint)
    assert says in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("endpoint", "resolved", "host"),
    [
        ("https://s3.example.com/", "https://s3.example.com", "s3.example.com"),
        ("HTTPS://S3.Example.COM", "https://s3.example.com", "s3.example.com"),
        ("https://s3.example.com:443", "https://s3.example.com", "s3.example.com"),
        ("http://s3.example.com:80", "http://s3.example.com", "s3.example.com"),
        ("http://127.0.0.1:8333", "http://127.0.0.1:8333", "127.0.0.1:8333"),
        ("https://127.0.0.1:443", "https://127.0.0.1", "127.0.0.1"),
        ("http://[::1]:9000", "http://[::1]:9000", "[::1]:9000"),
        ("http://minio_1:9000", "http://minio_1:9000", "minio_1:9000"),
    ],
)
def test_endpoint_is_normalised_and_the_host_header_omits_default_ports(
    endpoint: str, resolved: str, host: str
) -> None:
    config = RemoteConfig.from_url("s3://my-bucket/p", endpoint_url=endpoint)
    assert config.resolved_endpoint == resolved
    assert config.endpoint_url == resolved
    assert config.signing_host == host  # path style here: custom hosts


# --------------------------------------------------------------------------------------------
# Region and addressing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "region", "expected"),
    [
        (B2, None, "us-west-002"),
        ("https://s3.eu-central-003.backblazeb2.com", None, "eu-central-003"),
        ("https://s3.us-east-005.backblazeb2.com", "us-east-005", "us-east-005"),
        ("https://s3.eu-west-1.amazonaws.com", None, "eu-west-1"),
        ("https://s3-eu-west-1.amazonaws.com", None, "eu-west-1"),
        ("https://s3.dualstack.ap-southeast-2.amazonaws.com", None, "ap-southeast-2"),
        ("https://s3-fips.us-gov-west-1.amazonaws.com", None, "us-gov-west-1"),
        ("https://s3.cn-north-1.amazonaws.com.cn", None, "cn-north-1"),
        ("https://s3.amazonaws.com", None, "us-east-1"),
        ("https://s3.amazonaws.com", "eu-west-3", "eu-west-3"),
        ("https://s3-external-1.amazonaws.com", None, "us-east-1"),
        (None, None, "us-east-1"),
        (None, "eu-west-1", "eu-west-1"),
        ("http://127.0.0.1:8333", None, "us-east-1"),
        ("http://minio:9000", "home-lab", "home-lab"),
        ("https://storage.example.com", "", "us-east-1"),
    ],
)
def test_region_is_derived_from_the_endpoint(
    endpoint: str | None, region: str | None, expected: str
) -> None:
    config = RemoteConfig.from_url("s3://my-bucket/p", endpoint_url=endpoint, region=region)
    assert config.region == expected


@pytest.mark.parametrize(
    ("region", "endpoint"),
    [
        ("us-east-1", "https://s3.us-east-1.amazonaws.com"),
        ("eu-west-1", "https://s3.eu-west-1.amazonaws.com"),
        ("cn-north-1", "https://s3.cn-north-1.amazonaws.com.cn"),
    ],
)
def test_aws_default_endpoint_is_regional(region: str, endpoint: str) -> None:
    config = RemoteConfig.from_url("s3://my-bucket/p", region=region)
    assert config.endpoint_url is None
    assert config.resolved_endpoint == endpoint


def test_b2_region_must_match_its_endpoint() -> None:
    with pytest.raises(UsageError) as info:
        RemoteConfig.from_url("s3://my-bucket/p", endpoint_url=B2, region="us-east-1")
    message = str(info.value)
    assert "'us-east-1'" in message
    assert "'us-west-002'" in message
    assert "Backblaze B2" in message
    assert "SigV4" in message
    assert "leave the region out" in message


def test_aws_regional_endpoint_and_region_must_agree() -> None:
    with pytest.raises(UsageError, match=r"region 'us-east-1' does not match the AWS endpoint"):
        RemoteConfig.from_url(
            "s3://my-bucket/p",
            endpoint_url="https://s3.eu-west-1.amazonaws.com",
            region="us-east-1",
        )


def test_region_with_a_slash_is_refused() -> None:
    # It would end up inside the SigV4 credential scope, which is '/'-separated.
    with pytest.raises(UsageError, match="not a region name"):
        RemoteConfig.from_url("s3://my-bucket/p", endpoint_url="http://minio:9000", region="a/b")


@pytest.mark.parametrize(
    ("endpoint", "bucket", "requested", "style", "base"),
    [
        (None, "my-bucket", "auto", "virtual", "https://my-bucket.s3.us-east-1.amazonaws.com/"),
        (B2, "my-bucket", "auto", "virtual", "https://my-bucket.s3.us-west-002.backblazeb2.com/"),
        (B2, "my.bucket", "auto", "path", f"{B2}/my.bucket/"),  # TLS wildcard: one label
        (B2, "my-bucket", "path", "path", f"{B2}/my-bucket/"),
        (
            B2,
            "my-bucket",
            Addressing.VIRTUAL,
            "virtual",
            "https://my-bucket.s3.us-west-002.backblazeb2.com/",
        ),
        ("http://127.0.0.1:8333", "my-bucket", "auto", "path", "http://127.0.0.1:8333/my-bucket/"),
        ("http://localhost:9000", "my-bucket", "auto", "path", "http://localhost:9000/my-bucket/"),
        ("https://minio.corp", "my-bucket", "auto", "path", "https://minio.corp/my-bucket/"),
        ("https://minio.corp", "my-bucket", "virtual", "virtual", "https://my-bucket.minio.corp/"),
        ("http://minio:9000", "my.bucket", "virtual", "virtual", "http://my.bucket.minio:9000/"),
        ("http://[::1]:9000", "my-bucket", "auto", "path", "http://[::1]:9000/my-bucket/"),
    ],
)
def test_addressing(
    endpoint: str | None, bucket: str, requested: str, style: str, base: str
) -> None:
    config = RemoteConfig.from_url(f"s3://{bucket}/p", endpoint_url=endpoint, addressing=requested)
    assert config.resolved_addressing is Addressing(style)
    assert config.base_url == base
    assert config.object_url("p/k") == f"{base}p/k"
    host = base.split("://", 1)[1].split("/", 1)[0]
    assert config.signing_host == host
    expected_path = "/p/k" if style == "virtual" else f"/{bucket}/p/k"
    assert config.canonical_path("p/k") == expected_path


@pytest.mark.parametrize(
    ("endpoint", "bucket", "says"),
    [
        ("http://127.0.0.1:9000", "my-bucket", "is an IP address"),
        (B2, "my.bucket", "TLS certificate"),
        (B2, "MyBucket", "upper case"),
        ("https://minio.corp", "my_bucket", "underscores"),
    ],
)
def test_virtual_addressing_that_cannot_work_is_refused(
    endpoint: str, bucket: str, says: str
) -> None:
    with pytest.raises(UsageError) as info:
        RemoteConfig.from_url(f"s3://{bucket}/p", endpoint_url=endpoint, addressing="virtual")
    assert says in str(info.value)
    assert "use path addressing" in str(info.value)


def test_unknown_addressing_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not one of auto, path, virtual"):
        RemoteConfig.from_url("s3://my-bucket/p", addressing="sideways")


# --------------------------------------------------------------------------------------------
# Keys and URLs
# --------------------------------------------------------------------------------------------


def test_key_joins_the_prefix() -> None:
    obj = "files/md5/ab/cdef0123456789abcdef0123456789"
    assert RemoteConfig.from_url("s3://b-1/dvcstore/").key(obj) == f"dvcstore/{obj}"
    assert RemoteConfig.from_url("s3://b-1/a/b").key(obj) == f"a/b/{obj}"
    assert RemoteConfig.from_url("s3://b-1").key(obj) == obj
    for bad in ("", "/files/md5/ab/cd"):
        with pytest.raises(ValueError, match="relative key"):
            RemoteConfig.from_url("s3://b-1/p").key(bad)


@pytest.mark.parametrize(
    ("key", "encoded"),
    [
        ("dvcstore/files/md5/ab/cdef", "dvcstore/files/md5/ab/cdef"),
        ("with space/a b", "with%20space/a%20b"),
        ("a+b=c&d", "a%2Bb%3Dc%26d"),
        ("données/é.txt", "donn%C3%A9es/%C3%A9.txt"),
        ("日本/データ", "%E6%97%A5%E6%9C%AC/%E3%83%87%E3%83%BC%E3%82%BF"),
        ("keep-._~/these", "keep-._~/these"),
        ("q?h#p%25", "q%3Fh%23p%2525"),
        ("a//b/", "a//b/"),
    ],
)
def test_object_url_encodes_keys_as_sigv4_requires(key: str, encoded: str) -> None:
    config = RemoteConfig.from_url("s3://my-bucket", endpoint_url=B2)
    assert config.canonical_path(key) == f"/{encoded}"
    assert config.object_url(key) == f"https://my-bucket.s3.us-west-002.backblazeb2.com/{encoded}"
    path_style = RemoteConfig.from_url("s3://my-bucket", endpoint_url=B2, addressing="path")
    assert path_style.canonical_path(key) == f"/my-bucket/{encoded}"
    assert path_style.object_url(key) == f"{B2}/my-bucket/{encoded}"


def test_bucket_level_path_for_listing() -> None:
    assert RemoteConfig.from_url("s3://my-bucket", addressing="path").canonical_path("") == (
        "/my-bucket"
    )
    assert RemoteConfig.from_url("s3://my-bucket").canonical_path("") == "/"


@pytest.mark.parametrize("style", ["path", "virtual"])
@pytest.mark.parametrize(
    "endpoint", [B2, None, "https://s3.eu-west-1.amazonaws.com", "http://minio.local:9000"]
)
def test_object_url_matches_botocore(style: str, endpoint: str | None) -> None:
    """botocore is the reference: our URL must be byte for byte the one it would sign."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.config import Config  # noqa: PLC0415 - only after importorskip

    config = RemoteConfig.from_url(
        "s3://my-bucket/dvc store",
        endpoint_url=endpoint,
        region="eu-west-1" if endpoint and "amazonaws" in endpoint else None,
        addressing=style,
    )
    client = botocore_session.get_session().create_client(
        "s3",
        # botocore's own AWS default is the legacy global endpoint for us-east-1; the regional
        # one we use is as valid, and what this compares is everything else.
        endpoint_url=config.resolved_endpoint,
        region_name=config.region,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=APP_KEY,
        config=Config(s3={"addressing_style": style}, signature_version="s3v4"),
    )
    for relative in ("files/md5/ab/cdef", "données/naïve résumé.bin", "a+b ~c!*'()=&$,;@:[]"):
        key = config.key(relative)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": "my-bucket", "Key": key}
        )
        assert config.object_url(key) == url.split("?", 1)[0]


def test_describe_names_url_and_endpoint() -> None:
    config = RemoteConfig.from_url("s3://my-bucket/dvcstore", endpoint_url=B2)
    assert config.describe() == f"s3://my-bucket/dvcstore at {B2}"
    assert str(config) == config.describe()
    assert str(RemoteConfig.from_url("s3://my-bucket")) == (
        "s3://my-bucket at https://s3.us-east-1.amazonaws.com"
    )


# --------------------------------------------------------------------------------------------
# TLS options and the value object's invariants
# --------------------------------------------------------------------------------------------


def test_ca_bundle_must_be_an_existing_file(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    config = RemoteConfig.from_url("s3://my-bucket", endpoint_url=B2, ca_bundle=bundle)
    assert config.ca_bundle == bundle
    assert config.verify_tls
    with pytest.raises(
        UsageError, match=re.escape(f"CA bundle {tmp_path / 'missing.pem'} does not exist")
    ):
        RemoteConfig.from_url("s3://my-bucket", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(UsageError, match=re.escape(f"CA bundle {tmp_path} is not a file")):
        RemoteConfig.from_url("s3://my-bucket", ca_bundle=tmp_path)
    with pytest.raises(UsageError, match="TLS verification is off"):
        RemoteConfig.from_url("s3://my-bucket", ca_bundle=bundle, verify_tls=False)


def test_direct_construction_is_validated_too() -> None:
    config = RemoteConfig.from_url("s3://my-bucket/p", endpoint_url=B2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.region = "us-east-1"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"build it with RemoteConfig\.from_url"):
        dataclasses.replace(config, url="s3://other-bucket/p")
    with pytest.raises(UsageError, match="does not match the Backblaze B2 endpoint"):
        dataclasses.replace(config, region="eu-central-003")
    with pytest.raises(UsageError, match="invalid"):
        RemoteConfig(url="s3://x", bucket="x", region="us-east-1")
    # Replacing re-resolves what depends on the fields.
    path = dataclasses.replace(config, addressing=Addressing.PATH)
    assert path.object_url("p/k") == f"{B2}/my-bucket/p/k"
    assert config.object_url("p/k") == "https://my-bucket.s3.us-west-002.backblazeb2.com/p/k"
    assert path != config
    assert dataclasses.replace(config) == config


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------


def test_credentials_repr_masks_the_key_id_secret_and_token() -> None:
    # The key id is masked too: people paste the secret into the key-id file.
    c = creds(secret=CANARY, token=CANARY + "TOKEN")
    fingerprint = hashlib.sha256(KEY_ID.encode()).hexdigest()[:8]
    assert c.fingerprint == f"sha256:{fingerprint}"
    for text in (
        repr(c),
        str(c),
        f"{c}",
        f"{c!r}",
        repr([c]),
        repr(StaticCredentials(c, source="x")),
    ):
        assert CANARY not in text
        assert KEY_ID not in text
        assert f"key id sha256:{fingerprint}" in text
        assert "secret=***" in text
    assert "session_token=***" in repr(c)
    assert "session_token" not in repr(creds())
    assert c.secret_access_key == CANARY  # the value itself is there for the signer


@pytest.mark.parametrize(
    ("key_id", "secret", "token", "says"),
    [
        ("", APP_KEY, None, "access key id is empty"),
        (KEY_ID, "", None, "secret access key is empty"),
        (KEY_ID, APP_KEY, "", "session token is empty"),
        (f"{KEY_ID}\n", APP_KEY, None, "access key id contains spaces"),
        (KEY_ID, f" {APP_KEY}", None, "secret access key contains spaces"),
        (KEY_ID, f"{APP_KEY}é", None, "non-ASCII"),
        (KEY_ID, APP_KEY, "tok\ten", "session token contains spaces, control"),
    ],
)
def test_credentials_refuse_mangled_keys(
    key_id: str, secret: str, token: str | None, says: str
) -> None:
    with pytest.raises(UsageError, match=says):
        creds(key_id, secret, token)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": APP_KEY}, creds()),
        (
            {
                "AWS_ACCESS_KEY_ID": KEY_ID,
                "AWS_SECRET_ACCESS_KEY": APP_KEY,
                "AWS_SESSION_TOKEN": SESSION,
            },
            creds(token=SESSION),
        ),
        ({"B2_APPLICATION_KEY_ID": KEY_ID, "B2_APPLICATION_KEY": APP_KEY}, creds()),
        (
            {
                "AWS_ACCESS_KEY_ID": "AKIAFIRST",
                "AWS_SECRET_ACCESS_KEY": "first",
                "B2_APPLICATION_KEY_ID": KEY_ID,
                "B2_APPLICATION_KEY": APP_KEY,
            },
            creds("AKIAFIRST", "first"),
        ),
        (
            {
                "AWS_ACCESS_KEY_ID": "",
                "AWS_SECRET_ACCESS_KEY": "",
                "B2_APPLICATION_KEY_ID": KEY_ID,
                "B2_APPLICATION_KEY": APP_KEY,
            },
            creds(),
        ),
    ],
)
def test_env_credentials(environ: dict[str, str], expected: Credentials) -> None:
    source = EnvCredentials(environ)
    assert source.get() == expected
    assert source.refresh() == expected


def test_env_credentials_follow_the_mapping() -> None:
    environ = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": APP_KEY}
    source = EnvCredentials(environ)
    assert source.get() == creds()
    environ["AWS_SECRET_ACCESS_KEY"] = ROTATED
    assert source.refresh() == creds(secret=ROTATED)


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        ({"AWS_ACCESS_KEY_ID": KEY_ID}, "AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": APP_KEY}, "AWS_ACCESS_KEY_ID"),
        ({"AWS_SESSION_TOKEN": SESSION}, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"B2_APPLICATION_KEY_ID": KEY_ID}, "B2_APPLICATION_KEY"),
        ({"B2_APPLICATION_KEY": APP_KEY}, "B2_APPLICATION_KEY_ID"),
        (
            # A half pair is an error even when the other pair is complete: which was meant?
            {
                "AWS_ACCESS_KEY_ID": KEY_ID,
                "B2_APPLICATION_KEY_ID": KEY_ID,
                "B2_APPLICATION_KEY": APP_KEY,
            },
            "AWS_SECRET_ACCESS_KEY",
        ),
    ],
)
def test_env_half_a_pair_names_the_missing_variable(environ: dict[str, str], missing: str) -> None:
    with pytest.raises(UsageError) as info:
        EnvCredentials(environ).get()
    assert not isinstance(info.value, NoCredentialsError)  # a chain must stop here
    assert f"but {missing} not" in str(info.value)
    assert f"Fix: set {missing}" in str(info.value)


def test_env_nothing_set_is_not_configured() -> None:
    with pytest.raises(NoCredentialsError) as info:
        EnvCredentials({"AWS_REGION": "eu-west-1", "HOME": "/root"}).get()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "B2_APPLICATION_KEY_ID"):
        assert name in str(info.value)
    assert "kubectl create secret generic" in str(info.value)


# -- dotenv files ------------------------------------------------------------------------------


def test_read_env_file_as_the_b2_tutorial_writes_it(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        textwrap.dedent(
            f"""\
            # Backblaze B2 application key (keyID / applicationKey)
            B2_APPLICATION_KEY_ID={KEY_ID}
            export B2_APPLICATION_KEY='{APP_KEY}'

            AWS_ACCESS_KEY_ID="{KEY_ID}"   # the same key, under AWS's name
              AWS_SECRET_ACCESS_KEY = {APP_KEY}
            EMPTY=
            SPACED=two words  # trailing comment
            HASH=abc#def
            QUOTED_HASH='a #b'
            DOLLAR="$HOME/x"
            URL=s3://bucket/prefix?x=1&y=2
            B2_APPLICATION_KEY_ID=overridden
            """
        )
    )
    assert read_env_file(env) == {
        "B2_APPLICATION_KEY_ID": "overridden",
        "B2_APPLICATION_KEY": APP_KEY,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": APP_KEY,
        "EMPTY": "",
        "SPACED": "two words",
        "HASH": "abc#def",
        "QUOTED_HASH": "a #b",
        "DOLLAR": "$HOME/x",
        "URL": "s3://bucket/prefix?x=1&y=2",
    }


def test_read_env_file_with_bom_and_crlf(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_bytes(
        f"\ufeffAWS_ACCESS_KEY_ID={KEY_ID}\r\nAWS_SECRET_ACCESS_KEY={APP_KEY}\r\n".encode()
    )
    assert read_env_file(env) == {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": APP_KEY}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (CANARY, "not KEY=VALUE"),
        (f"1KEY={CANARY}", "not KEY=VALUE"),
        (f"MY KEY={CANARY}", "not KEY=VALUE"),
        (f'AWS_SECRET_ACCESS_KEY="{CANARY}', "the value of AWS_SECRET_ACCESS_KEY is badly quoted"),
        (f"AWS_SECRET_ACCESS_KEY='{CANARY}' junk", "the value of AWS_SECRET_ACCESS_KEY is badly"),
    ],
)
def test_read_env_file_malformed_line_is_numbered_not_shown(
    tmp_path: Path, line: str, says: str
) -> None:
    env = tmp_path / ".env"
    env.write_text(f"# keys\nAWS_ACCESS_KEY_ID={KEY_ID}\n{line}\n")
    with pytest.raises(UsageError) as info:
        read_env_file(env)
    assert f"env file {env}, line 3: {says}" in str(info.value)
    assert_no_canary(info.value)


def test_read_env_file_missing(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match=re.escape(f"env file {tmp_path / 'nope.env'} does not exist")
    ):
        read_env_file(tmp_path / "nope.env")


def test_credentials_from_env_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(f"B2_APPLICATION_KEY_ID={KEY_ID}\nB2_APPLICATION_KEY={APP_KEY}\n")
    source = credentials_from_env_file(env)
    assert source.get() == creds()
    assert str(env) in source.describe()
    env.write_text("B2_BUCKET=my-bucket\n")
    with pytest.raises(NoCredentialsError, match=re.escape(f"in env file {env}")):
        credentials_from_env_file(env).get()
    env.write_text(f"B2_APPLICATION_KEY_ID={KEY_ID}\n")
    with pytest.raises(
        UsageError, match=re.escape(f"B2_APPLICATION_KEY_ID set in env file {env} but")
    ):
        credentials_from_env_file(env).get()


# -- Secret volumes ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_secret_dir_reads_a_kubelet_volume(tmp_path: Path) -> None:
    kubelet_update(
        tmp_path / "s",
        {"AWS_ACCESS_KEY_ID": f"{KEY_ID}\n", "AWS_SECRET_ACCESS_KEY": f"{APP_KEY}\n"},
        "2026_11_21_10_00_00.000000001",
    )
    source = SecretDirCredentials(tmp_path / "s")
    assert source.get() == creds()
    assert source.describe() == (
        f"Secret files in {tmp_path / 's'} (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": APP_KEY}, creds()),
        (
            {"access_key_id": KEY_ID, "secret_access_key": APP_KEY, "session_token": SESSION},
            creds(token=SESSION),
        ),
        ({"keyID": KEY_ID, "applicationKey": APP_KEY}, creds()),
        ({"B2_APPLICATION_KEY_ID": KEY_ID, "B2_APPLICATION_KEY": APP_KEY}, creds()),
        ({"applicationKeyId": KEY_ID, "applicationKey": f"{APP_KEY}\r\n"}, creds()),
        (
            # First candidate wins: the AWS names over B2's.
            {
                "AWS_ACCESS_KEY_ID": "AKIAFIRST",
                "keyID": KEY_ID,
                "AWS_SECRET_ACCESS_KEY": "first",
                "applicationKey": APP_KEY,
            },
            creds("AKIAFIRST", "first"),
        ),
    ],
)
def test_secret_dir_key_names(tmp_path: Path, files: dict[str, str], expected: Credentials) -> None:
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    assert SecretDirCredentials(tmp_path).get() == expected


def test_secret_dir_custom_key_names(tmp_path: Path) -> None:
    (tmp_path / "id").write_text(KEY_ID)
    (tmp_path / "key").write_text(APP_KEY)
    source = SecretDirCredentials(tmp_path, id_keys=["id"], secret_keys=["key"], token_keys=[])
    assert source.get() == creds()
    assert source.describe() == f"Secret files in {tmp_path} (id, key)"
    with pytest.raises(UsageError, match="not a Secret key name"):
        SecretDirCredentials(tmp_path, id_keys=["..data"])
    # A key pasted where its name goes is refused without being echoed.
    with pytest.raises(UsageError, match="not a Secret key name") as info:
        SecretDirCredentials(tmp_path, id_keys=[f"{CANARY}/x+y"])
    assert_no_canary(info.value)


def test_secret_dir_missing_is_not_configured(tmp_path: Path) -> None:
    missing = tmp_path / "var/run/secrets/datapin"
    with pytest.raises(NoCredentialsError) as info:
        SecretDirCredentials(missing).get()
    message = str(info.value)
    assert f"{missing} does not exist" in message
    assert "kubectl create secret generic" in message
    assert "--from-literal=AWS_ACCESS_KEY_ID=<keyID>" in message
    assert "--from-literal=AWS_SECRET_ACCESS_KEY=<applicationKey>" in message


def test_secret_dir_without_known_names_lists_what_it_holds(tmp_path: Path) -> None:
    kubelet_update(tmp_path, {"username": "u", "password": CANARY}, "2026_01_01")
    with pytest.raises(NoCredentialsError) as info:
        SecretDirCredentials(tmp_path).get()
    message = str(info.value)
    for name in (*DEFAULT_ID_KEYS, *DEFAULT_SECRET_KEYS):
        assert name in message
    assert "it holds: password, username" in message  # names, never contents
    assert "..data" not in message
    assert_no_canary(info.value)


@pytest.mark.parametrize(
    ("files", "says"),
    [
        (
            {"AWS_ACCESS_KEY_ID": KEY_ID},
            "AWS_ACCESS_KEY_ID is there but none of AWS_SECRET_ACCESS_KEY",
        ),
        ({"applicationKey": APP_KEY}, "applicationKey is there but none of AWS_ACCESS_KEY_ID"),
        (
            {"AWS_SESSION_TOKEN": SESSION},
            "AWS_SESSION_TOKEN is there but none of AWS_ACCESS_KEY_ID",
        ),
        (
            {"AWS_ACCESS_KEY_ID": "\n", "AWS_SECRET_ACCESS_KEY": APP_KEY},
            "AWS_ACCESS_KEY_ID is empty",
        ),
    ],
)
def test_secret_dir_half_configured_is_an_error(
    tmp_path: Path, files: dict[str, str], says: str
) -> None:
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    with pytest.raises(UsageError, match=says) as info:
        SecretDirCredentials(tmp_path).get()
    assert not isinstance(info.value, NoCredentialsError)


def test_secret_dir_rotation_by_kubelet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = tmp_path / "secret"
    first = {"AWS_ACCESS_KEY_ID": "KEYONE", "AWS_SECRET_ACCESS_KEY": CANARY + "ONE"}
    second = {"AWS_ACCESS_KEY_ID": "KEYTWO", "AWS_SECRET_ACCESS_KEY": CANARY + "TWO"}
    third = {"AWS_ACCESS_KEY_ID": "KEYTHREE", "AWS_SECRET_ACCESS_KEY": CANARY + "THREE"}
    kubelet_update(secret, first, "2026_11_21_10_00_00.000000001")
    clock = FakeClock()
    source = SecretDirCredentials(secret, clock=clock, min_check_interval=1.0)
    assert source.get().access_key_id == "KEYONE"

    kubelet_update(secret, second, "2026_11_21_10_05_00.000000002")
    assert source.get().access_key_id == "KEYONE"  # checked less than a second ago
    clock.advance(0.9)
    assert source.get().access_key_id == "KEYONE"
    clock.advance(0.2)
    assert source.get() == creds("KEYTWO", CANARY + "TWO")

    kubelet_update(secret, third, "2026_11_21_10_10_00.000000003")
    assert source.refresh() == creds("KEYTHREE", CANARY + "THREE")  # at once, no clock move
    assert source.get().access_key_id == "KEYTHREE"

    # The rotation is logged by a fingerprint of the key id, never the id itself (it may be
    # a secret pasted into the wrong file).
    fingerprint = hashlib.sha256(b"KEYTWO").hexdigest()[:8]
    assert f"the keys changed, now key id sha256:{fingerprint}" in caplog.text
    assert "KEYTWO" not in caplog.text
    assert "KEYTHREE" not in caplog.text
    assert CANARY not in caplog.text


def test_secret_dir_rotation_of_plain_files(tmp_path: Path) -> None:
    """Not kubelet (a bind mount, docker secrets): rewritten files are noticed by stat."""
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("KEYONE")
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text("secret-one")
    clock = FakeClock()
    source = SecretDirCredentials(tmp_path, clock=clock)
    assert source.get().access_key_id == "KEYONE"
    # In place (same inode; size and mtime change) and by rename (new inode).
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("KEYTWO22")
    replacement = tmp_path / "new"
    replacement.write_text("secret-two")
    replacement.rename(tmp_path / "AWS_SECRET_ACCESS_KEY")
    clock.advance(1.5)
    assert source.get() == creds("KEYTWO22", "secret-two")


def test_secret_dir_does_not_touch_the_filesystem_within_the_interval(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    kubelet_update(secret, {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": APP_KEY}, "t1")
    clock = FakeClock()
    source = SecretDirCredentials(secret, clock=clock)
    assert source.get() == creds()
    clock.advance(1.5)
    assert source.get() == creds()  # looked (nothing changed): the interval starts again
    clock.advance(0.5)
    secret.rename(tmp_path / "gone")
    for _ in range(1000):  # a hot download loop
        assert source.get() == creds()
    clock.advance(1.0)
    with pytest.raises(NoCredentialsError, match="does not exist"):
        source.get()
    # A failed read is retried on the next call, not hidden behind the interval.
    (tmp_path / "gone").rename(secret)
    assert source.get() == creds()


def test_secret_dir_reads_one_snapshot_when_kubelet_swaps_mid_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """readlink(..data) saw the old version, which kubelet then swapped out and deleted."""
    secret = tmp_path / "secret"
    kubelet_update(secret, {"AWS_ACCESS_KEY_ID": "KEYONE", "AWS_SECRET_ACCESS_KEY": "one"}, "t1")
    real_readlink = os.readlink
    stale = ["..t1"]

    def racing_readlink(path: str | os.PathLike[str]) -> str:
        if stale and Path(path).name == "..data":
            seen = stale.pop()
            kubelet_update(
                secret, {"AWS_ACCESS_KEY_ID": "KEYTWO", "AWS_SECRET_ACCESS_KEY": "two"}, "t2"
            )
            return seen
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", racing_readlink)
    assert SecretDirCredentials(secret).get() == creds("KEYTWO", "two")


def test_secret_dir_refuses_huge_and_binary_files(tmp_path: Path) -> None:
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text(KEY_ID)
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_bytes(b"\xff\xfe" + CANARY.encode())
    with pytest.raises(UsageError, match="not ASCII text") as info:
        SecretDirCredentials(tmp_path).get()
    assert_no_canary(info.value)
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text(CANARY * 2000)
    with pytest.raises(UsageError, match="too big for a key") as info:
        SecretDirCredentials(tmp_path).get()
    assert_no_canary(info.value)


# -- static sources and chains -----------------------------------------------------------------


class Counting:
    """A source wrapper counting calls, to see what a chain asks."""

    def __init__(self, inner: CredentialSource) -> None:
        self.inner = inner
        self.gets = 0
        self.refreshes = 0

    def get(self) -> Credentials:
        self.gets += 1
        return self.inner.get()

    def refresh(self) -> Credentials:
        self.refreshes += 1
        return self.inner.refresh()

    def describe(self) -> str:
        return self.inner.describe()


def test_static_credentials() -> None:
    source = StaticCredentials(creds(), source=".dvc/config.local of /repo")
    assert source.get() == source.refresh() == creds()
    assert source.describe() == ".dvc/config.local of /repo"


def test_chain_takes_the_first_configured_source(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    env = EnvCredentials({})
    static = StaticCredentials(creds("STATIC", "s"), source="config.local")
    chain = ChainCredentials([SecretDirCredentials(secret), env, static])
    assert chain.get() == creds("STATIC", "s")
    assert chain.current is static
    # The Secret appears (mounted late): refresh() walks the chain again, in order.
    kubelet_update(secret, {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": APP_KEY}, "t1")
    assert chain.get() == creds("STATIC", "s")  # get() sticks to the source that answered
    assert chain.refresh() == creds()
    assert isinstance(chain.current, SecretDirCredentials)


def test_chain_get_sticks_to_the_answering_source() -> None:
    first = Counting(EnvCredentials({}))
    second = Counting(StaticCredentials(creds(), source="static"))
    chain = ChainCredentials([first, second])
    for _ in range(5):
        assert chain.get() == creds()
    assert (first.gets, second.gets) == (1, 5)
    chain.refresh()
    assert (first.refreshes, second.refreshes) == (1, 1)


def test_chain_falls_back_when_its_source_loses_the_keys(tmp_path: Path) -> None:
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text(KEY_ID)
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text(APP_KEY)
    clock = FakeClock()
    chain = ChainCredentials(
        [
            SecretDirCredentials(tmp_path, clock=clock),
            StaticCredentials(creds("B", "b"), source="x"),
        ]
    )
    assert chain.get() == creds()
    (tmp_path / "AWS_ACCESS_KEY_ID").unlink()
    (tmp_path / "AWS_SECRET_ACCESS_KEY").unlink()
    clock.advance(2)
    assert chain.get() == creds("B", "b")


def test_chain_stops_at_a_half_configured_source() -> None:
    chain = ChainCredentials(
        [EnvCredentials({"AWS_ACCESS_KEY_ID": KEY_ID}), StaticCredentials(creds(), source="x")]
    )
    with pytest.raises(UsageError, match="AWS_SECRET_ACCESS_KEY") as info:
        chain.get()
    assert not isinstance(info.value, NoCredentialsError)


def test_chain_with_nothing_lists_every_place_looked(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("B2_BUCKET=my-bucket\n")
    chain = ChainCredentials(
        [
            SecretDirCredentials(tmp_path / "secret"),
            credentials_from_env_file(tmp_path / ".env"),
            EnvCredentials({}),
        ]
    )
    with pytest.raises(NoCredentialsError) as info:
        chain.get()
    message = str(info.value)
    assert "any of the 3 places" in message
    assert f"1) Secret files in {tmp_path / 'secret'}" in message
    assert (
        "2) AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or B2_APPLICATION_KEY_ID/"
        f"B2_APPLICATION_KEY) in env file {tmp_path / '.env'}" in message
    )
    assert "3) environment variables AWS_ACCESS_KEY_ID" in message
    assert "kubectl create secret generic" in message
    assert chain.describe().count("; then ") == 2
    with pytest.raises(ValueError, match="at least one source"):
        ChainCredentials([])


# --------------------------------------------------------------------------------------------
# DVC repositories: hand-written configs
# --------------------------------------------------------------------------------------------


def dvc_repo(root: Path, config: str | None, local: str | None = None) -> Path:
    """A repository with only `.dvc/config` (and `.dvc/config.local`) as given."""
    repo = root / "repo"
    (repo / ".dvc").mkdir(parents=True)
    if config is not None:
        (repo / ".dvc" / "config").write_text(textwrap.dedent(config))
    if local is not None:
        (repo / ".dvc" / "config.local").write_text(textwrap.dedent(local))
    return repo


TUTORIAL = """\
    [core]
        remote = b2
    ['remote "b2"']
        url = s3://my-bucket/dvcstore
        endpointurl = https://s3.us-west-002.backblazeb2.com
    """


@pytest.mark.parametrize(
    "header",
    [
        "['remote \"b2\"']",  # what DVC writes
        '[remote "b2"]',  # what people write by hand (and git config style)
        "[ 'remote  \"b2\"' ]",
        "['Remote \"B2\"']",  # DVC lower-cases section names
    ],
)
def test_section_quote_styles(tmp_path: Path, header: str) -> None:
    repo = dvc_repo(
        tmp_path,
        f"""\
        [core]
            remote = b2
        {header}
            url = s3://my-bucket/dvcstore
            endpointurl = {B2}
        """,
    )
    remote = read_dvc_remote(repo)
    assert remote.name == "b2"
    assert remote.config is not None
    assert remote.config.describe() == f"s3://my-bucket/dvcstore at {B2}"
    assert remote.config.region == "us-west-002"
    assert remote.config.remote_name == "b2"
    assert remote.directory is None
    assert remote.credentials is None
    assert remote.credential_source() is None


def test_values_quoted_commented_and_oddly_indented(tmp_path: Path) -> None:
    repo = dvc_repo(
        tmp_path,
        f"""\
        # written by hand
        [core]
        remote = "b2"   # the default
        ['remote "b2"']
        \tURL = 's3://my-bucket/dvc store'
              EndpointUrl = {B2}  # B2 us-west
           region = \"\"\"us-west-002\"\"\"
        ssl_verify = "true"
        """,
        local=f"""\
        ['remote "b2"']
            access_key_id = {KEY_ID}
            secret_access_key = '''{APP_KEY}'''
        """,
    )
    remote = read_dvc_remote(repo)
    assert remote.config is not None
    assert remote.config.url == "s3://my-bucket/dvc store"
    assert remote.config.resolved_endpoint == B2
    assert remote.config.verify_tls
    assert remote.credentials == creds()
    assert remote.credentials_file == repo / ".dvc" / "config.local"


def test_local_overrides_per_key(tmp_path: Path) -> None:
    repo = dvc_repo(
        tmp_path,
        TUTORIAL,
        local="""\
        ['remote "b2"']
            endpointurl = http://127.0.0.1:8333
        ['remote "mine"']
            url = s3://mine/x
        """,
    )
    remote = read_dvc_remote(repo)
    assert remote.config is not None
    assert remote.config.url == "s3://my-bucket/dvcstore"  # from config
    assert remote.config.resolved_endpoint == "http://127.0.0.1:8333"  # from config.local
    assert remote.config.region == "us-east-1"
    mine = read_dvc_remote(repo, "mine")  # defined only in config.local
    assert mine.config is not None
    assert mine.config.url == "s3://mine/x"


def test_default_remote_can_be_set_locally(tmp_path: Path) -> None:
    repo = dvc_repo(
        tmp_path,
        """\
        ['remote "a"']
            url = s3://bucket-a/x
        ['remote "b"']
            url = s3://bucket-b/x
        """,
        local="[core]\n    remote = b\n",
    )
    assert read_dvc_remote(repo).name == "b"
    assert read_dvc_remote(repo, "A").name == "a"  # DVC lower-cases remote names


def test_several_remotes_without_a_default(tmp_path: Path) -> None:
    repo = dvc_repo(
        tmp_path,
        """\
        ['remote "b2"']
            url = s3://bucket-a/x
        ['remote "backup"']
            url = s3://bucket-b/x
        """,
    )
    with pytest.raises(UsageError) as info:
        read_dvc_remote(repo)
    message = str(info.value)
    assert "2 DVC remotes are configured" in message
    assert "(b2, backup)" in message
    assert "`dvc remote default NAME`" in message
    assert "pass the remote's name" in message
    assert read_dvc_remote(repo, "backup").name == "backup"


def test_a_single_remote_needs_no_default(tmp_path: Path) -> None:
    repo = dvc_repo(tmp_path, "['remote \"only\"']\n    url = s3://bucket-a/x\n")
    assert read_dvc_remote(repo).name == "only"


@pytest.mark.parametrize(
    ("config", "local", "name", "says"),
    [
        (TUTORIAL, None, "nope", "no DVC remote named 'nope'"),
        (
            "[core]\n    remote = gone\n['remote \"b2\"']\n    url = s3://b-1/x\n",
            None,
            None,
            "the default remote (core.remote in",
        ),
        ("[core]\n    analytics = false\n", None, None, "no DVC remote is configured"),
        (None, None, None, "no DVC remote is configured"),
        ("['remote \"b2\"']\n    endpointurl = https://x.example\n", None, None, "has no url"),
    ],
)
def test_remote_selection_errors(
    tmp_path: Path, config: str | None, local: str | None, name: str | None, says: str
) -> None:
    repo = dvc_repo(tmp_path, config, local)
    with pytest.raises(UsageError, match=r"Fix: .*(dvc remote|pass)") as info:
        read_dvc_remote(repo, name)
    assert says in str(info.value)


def test_not_a_dvc_repository(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"is not a DVC repository: it has no \.dvc directory"):
        read_dvc_remote(tmp_path)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("../../store", "store"),  # DVC writes paths relative to .dvc/
        ("/abs/store", "/abs/store"),
        ("file:///abs/store", "/abs/store"),
    ],
)
def test_directory_remote(tmp_path: Path, url: str, expected: str) -> None:
    repo = dvc_repo(
        tmp_path, f"[core]\n    remote = local\n['remote \"local\"']\n    url = {url}\n"
    )
    remote = read_dvc_remote(repo)
    assert remote.config is None
    assert remote.directory == tmp_path / expected
    assert remote.describe() == f"DVC remote 'local' ({tmp_path / expected})"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("gs://bucket/p", "uses gs://"),
        ("azure://container/p", "uses azure://"),
        ("https://dvc.example.com/store", "uses https://"),
        ("ssh://host/store", "uses ssh://"),
        ("s3:/bucket/p", "write it as s3://bucket/prefix"),
        ("~/dvc-store", "use an absolute path"),
    ],
)
def test_unsupported_remote_urls(tmp_path: Path, url: str, says: str) -> None:
    repo = dvc_repo(tmp_path, f"['remote \"r\"']\n    url = {url}\n")
    with pytest.raises(UsageError) as info:
        read_dvc_remote(repo)
    assert says in str(info.value)
    if "://" in url and not url.startswith("s3"):
        assert "datapin reads s3:// remotes" in str(info.value)
        assert "directory remotes" in str(info.value)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("profile = default", "profile"),
        ("credentialpath = /root/.aws/credentials", "credentialpath"),
        ("configpath = /root/.aws/config", "configpath"),
        ("version_aware = true", "stores files by path, not by md5"),
        ("worktree = True", "stores files by path"),
        ("allow_anonymous_login = true", "needs keys"),
        ("sse_customer_key = c2VjcmV0", "SSE-C"),
        ("use_ssl = false", "use_ssl = false without an endpointurl"),
    ],
)
def test_options_that_change_auth_or_layout_are_refused(
    tmp_path: Path, option: str, says: str
) -> None:
    repo = dvc_repo(tmp_path, f"['remote \"b2\"']\n    url = s3://my-bucket/x\n    {option}\n")
    with pytest.raises(UsageError, match="Fix:") as info:
        read_dvc_remote(repo)
    assert says in str(info.value)


def test_harmless_options_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    repo = dvc_repo(
        tmp_path,
        """\
        ['remote "b2"']
            url = s3://my-bucket/x
            endpointurl = http://minio:9000
            use_ssl = false
            jobs = 64
            verify = true
            version_aware = false
            allow_anonymous_login = false
            sse = AES256
            acl = private
            listobjects = true
            read_timeout = 60
            colour = blue
        """,
    )
    remote = read_dvc_remote(repo)
    assert remote.config is not None
    assert remote.config.resolved_endpoint == "http://minio:9000"
    assert [r.getMessage() for r in caplog.records] == [
        f"DVC remote 'b2': ignoring unknown option 'colour' in {repo / '.dvc' / 'config'}"
    ]


@pytest.mark.parametrize(
    ("value", "verify", "bundle"),
    [("false", False, None), ("TRUE", True, None), ("certs/ca.pem", True, "certs/ca.pem")],
)
def test_ssl_verify(tmp_path: Path, value: str, verify: bool, bundle: str | None) -> None:
    repo = dvc_repo(
        tmp_path, f"['remote \"b2\"']\n    url = s3://my-bucket/x\n    ssl_verify = {value}\n"
    )
    (repo / "certs").mkdir()
    (repo / "certs" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = read_dvc_remote(repo).config
    assert config is not None
    assert config.verify_tls is verify
    # Relative to the repository root: DVC hands the value to botocore unchanged, so it is
    # relative to where `dvc` runs.
    assert config.ca_bundle == (repo / bundle if bundle else None)


def test_ssl_verify_missing_bundle_names_it(tmp_path: Path) -> None:
    repo = dvc_repo(
        tmp_path, "['remote \"b2\"']\n    url = s3://my-bucket/x\n    ssl_verify = ca.pem\n"
    )
    with pytest.raises(
        UsageError,
        match="DVC remote 'b2' .*CA bundle " + re.escape(f"{repo / 'ca.pem'} does not exist"),
    ):
        read_dvc_remote(repo)


def test_bad_values_name_the_file_and_the_fix(tmp_path: Path) -> None:
    repo = dvc_repo(
        tmp_path,
        f"['remote \"b2\"']\n    url = s3://my-bucket/x\n    endpointurl = {B2}/my-bucket\n",
    )
    with pytest.raises(UsageError) as info:
        read_dvc_remote(repo)
    message = str(info.value)
    assert message.startswith(f"DVC remote 'b2' (in {repo / '.dvc' / 'config'}): endpoint URL")
    assert "has a path (/my-bucket)" in message


@pytest.mark.parametrize(
    ("config", "local", "says"),
    [
        (
            "['remote \"b2\"']\n    url = s3://b-1/x\n    access_key_id = K\n",
            None,
            "has access_key_id (in",
        ),
        (TUTORIAL, "['remote \"b2\"']\n    secret_access_key = S\n", "no access_key_id"),
        (TUTORIAL, "['remote \"b2\"']\n    session_token = T\n", "has a session_token but no"),
    ],
)
def test_half_configured_dvc_credentials(
    tmp_path: Path, config: str, local: str | None, says: str
) -> None:
    repo = dvc_repo(tmp_path, config, local)
    with pytest.raises(UsageError, match="dvc remote modify --local b2") as info:
        read_dvc_remote(repo)
    assert says in str(info.value)


def test_keys_in_the_tracked_config_are_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    repo = dvc_repo(
        tmp_path,
        TUTORIAL + f"    access_key_id = {KEY_ID}\n    secret_access_key = {CANARY}\n",
    )
    remote = read_dvc_remote(repo)
    assert remote.credentials == creds(secret=CANARY)
    assert remote.credentials_file == repo / ".dvc" / "config"
    assert "which git tracks" in caplog.text
    assert CANARY not in caplog.text
    source = remote.credential_source()
    assert source is not None
    assert source.get() == creds(secret=CANARY)
    assert str(repo / ".dvc" / "config") in source.describe()
    assert CANARY not in repr(remote)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "[core]\n    remote = b2\n[core]\n    remote = x\n",
            "line 3: section [core] appears twice",
        ),
        (
            '[\'remote "b2"\']\n    url = s3://b-1/x\n[remote "b2"]\n    url = s3://b-1/y\n',
            "appears twice (with and without quotes)",
        ),
        (
            "['remote \"b2\"']\n    url = s3://b-1/x\n    URL = s3://b-1/y\n",
            "option 'url' appears twice",
        ),
        ("['remote \"b2\"']\n    url = s3://b-1/x\n    just words\n", "cannot parse line(s) 3"),
        ("url = s3://b-1/x\n", "line 1: an option before any [section]"),
        (
            "['remote \"b2\"']\n    url = s3://b-1/x, s3://b-1/y\n",
            "url is badly quoted or is a list",
        ),
        ('[\'remote "b2"\']\n    url = "s3://b-1/x\n', "url is badly quoted"),
        ("['remote \"b2\"']\n    url = 's3://b-1/x', 's3://b-1/y'\n", "is a list"),
        ('[\'remote "b2"\']\n    url = "s3://b-1/x" junk\n', "url is badly quoted"),
    ],
)
def test_broken_config_files(tmp_path: Path, text: str, says: str) -> None:
    repo = dvc_repo(tmp_path, text)
    with pytest.raises(UsageError, match="Fix:") as info:
        read_dvc_remote(repo)
    assert says in str(info.value)
    assert str(repo / ".dvc" / "config") in str(info.value)


# --------------------------------------------------------------------------------------------
# DVC repositories: configs written by the real DVC 3 and 2.58
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=[3, 2], ids=["dvc3", "dvc2"])
def dvc(request: pytest.FixtureRequest) -> Path:
    try:
        return find_dvc(request.param)
    except DvcUnavailable as exc:
        pytest.skip(f"real DVC {request.param} needed: {exc.reason}")


def real_repo(dvc: Path, root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    run_git(repo, "init", "-q")
    run_dvc(dvc, repo, "init", "-q")
    run_dvc(dvc, repo, "config", "core.analytics", "false")
    return repo


@pytest.mark.dvc
def test_real_dvc_b2_tutorial(dvc: Path, tmp_path: Path) -> None:
    repo = real_repo(dvc, tmp_path)
    run_dvc(dvc, repo, "remote", "add", "-d", "b2", "s3://my-bucket/dvcstore")
    run_dvc(dvc, repo, "remote", "modify", "b2", "endpointurl", B2)
    run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "access_key_id", KEY_ID)
    run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "secret_access_key", CANARY)
    assert "endpointurl" in (repo / ".dvc" / "config").read_text()
    assert CANARY in (repo / ".dvc" / "config.local").read_text()

    remote = read_dvc_remote(repo)
    assert remote.name == "b2"
    assert remote.config is not None
    assert remote.config.url == "s3://my-bucket/dvcstore"
    assert remote.config.region == "us-west-002"
    assert remote.config.resolved_addressing is Addressing.VIRTUAL
    assert remote.config.object_url(remote.config.key("files/md5/ab/cd")) == (
        "https://my-bucket.s3.us-west-002.backblazeb2.com/dvcstore/files/md5/ab/cd"
    )
    assert remote.credentials == creds(secret=CANARY)
    assert remote.credentials_file == repo / ".dvc" / "config.local"
    assert CANARY not in repr(remote)
    assert read_dvc_remote(repo, "b2") == remote


@pytest.mark.dvc
def test_real_dvc_quotes_awkward_secrets_and_we_read_them_back(dvc: Path, tmp_path: Path) -> None:
    repo = real_repo(dvc, tmp_path)
    run_dvc(dvc, repo, "remote", "add", "-d", "b2", "s3://my-bucket/dvcstore")
    run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "access_key_id", KEY_ID)
    # configobj quotes these: '#' (a comment otherwise), ',' (a list), quotes, both quotes
    # (triple quotes), and both quotes with '#'.
    for secret in (
        "ab#cd",
        "a,b",
        "it's",
        'say"hi"',
        "both'and\"",
        "all'\"#three",
        "x;y=z",
        "%s%%",
    ):
        run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "secret_access_key", secret)
        remote = read_dvc_remote(repo)
        assert remote.credentials == creds(secret=secret), (
            repo / ".dvc" / "config.local"
        ).read_text()


@pytest.mark.dvc
def test_real_dvc_secret_with_a_space_is_refused_without_showing_it(
    dvc: Path, tmp_path: Path
) -> None:
    repo = real_repo(dvc, tmp_path)
    run_dvc(dvc, repo, "remote", "add", "-d", "b2", "s3://my-bucket/dvcstore")
    run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "access_key_id", KEY_ID)
    run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "secret_access_key", f" {CANARY}")
    with pytest.raises(UsageError, match="secret access key contains spaces") as info:
        read_dvc_remote(repo)
    assert "DVC remote 'b2'" in str(info.value)
    assert_no_canary(info.value)


@pytest.mark.dvc
def test_real_dvc_remotes_and_defaults(dvc: Path, tmp_path: Path) -> None:
    repo = real_repo(dvc, tmp_path)
    store = tmp_path / "store"
    run_dvc(dvc, repo, "remote", "add", "local", "../store")  # relative to the cwd, the repo
    run_dvc(dvc, repo, "remote", "add", "B2", "s3://my-bucket/dvcstore")  # DVC lower-cases it
    run_dvc(dvc, repo, "remote", "add", "gcs", "gs://other/store")
    with pytest.raises(UsageError, match=r"3 DVC remotes are configured .* \(b2, gcs, local\)"):
        read_dvc_remote(repo)

    local = read_dvc_remote(repo, "local")
    assert local.directory == store
    assert local.config is None

    run_dvc(dvc, repo, "remote", "default", "b2")
    remote = read_dvc_remote(repo)
    assert remote.name == "b2"
    assert remote.config is not None
    assert remote.config.resolved_endpoint == "https://s3.us-east-1.amazonaws.com"

    with pytest.raises(UsageError, match="uses gs://"):
        read_dvc_remote(repo, "gcs")


@pytest.mark.dvc
def test_real_dvc_options(dvc: Path, tmp_path: Path) -> None:
    repo = real_repo(dvc, tmp_path)
    run_dvc(dvc, repo, "remote", "add", "-d", "b2", "s3://my-bucket/dvcstore")
    run_dvc(
        dvc,
        repo,
        "remote",
        "modify",
        "b2",
        "endpointurl",
        "https://s3.eu-central-003.backblazeb2.com",
    )
    run_dvc(dvc, repo, "remote", "modify", "b2", "region", "eu-central-003")
    run_dvc(dvc, repo, "remote", "modify", "b2", "ssl_verify", "false")
    run_dvc(dvc, repo, "remote", "modify", "b2", "jobs", "16")
    run_dvc(dvc, repo, "remote", "modify", "--local", "b2", "url", "s3://local-bucket/other")
    config = read_dvc_remote(repo).config
    assert config is not None
    assert config.url == "s3://local-bucket/other"
    assert config.region == "eu-central-003"
    assert not config.verify_tls

    run_dvc(dvc, repo, "remote", "modify", "b2", "region", "us-east-1")
    with pytest.raises(UsageError, match="does not match the Backblaze B2 endpoint"):
        read_dvc_remote(repo)
    run_dvc(dvc, repo, "remote", "modify", "--unset", "b2", "region")

    run_dvc(dvc, repo, "remote", "modify", "b2", "profile", "prod")
    with pytest.raises(UsageError) as info:
        read_dvc_remote(repo)
    assert "sets profile" in str(info.value)
    assert "dvc remote modify --local b2 access_key_id" in str(info.value)


# --------------------------------------------------------------------------------------------
# Secrets never show
# --------------------------------------------------------------------------------------------


def assert_no_canary(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert CANARY not in text
    assert CANARY not in repr(exc)
    cause = exc.__cause__
    while cause is not None:
        assert CANARY not in str(cause)
        cause = cause.__cause__


def _env(environ: dict[str, str]) -> Callable[[Path], object]:
    return lambda _: EnvCredentials(environ).get()


def _secret_files(files: dict[str, str | bytes]) -> Callable[[Path], object]:
    def run(tmp: Path) -> object:
        for name, value in files.items():
            (tmp / name).write_bytes(value.encode() if isinstance(value, str) else value)
        return SecretDirCredentials(tmp).get()

    return run


def _env_file(text: str) -> Callable[[Path], object]:
    def run(tmp: Path) -> object:
        (tmp / ".env").write_text(text)
        return credentials_from_env_file(tmp / ".env").get()

    return run


def _dvc_config(config: str, local: str = "") -> Callable[[Path], object]:
    def run(tmp: Path) -> object:
        return read_dvc_remote(dvc_repo(tmp, config, local))

    return run


_B2_SECTION = "['remote \"b2\"']\n"
LEAKS: dict[str, Callable[[Path], object]] = {
    "credentials: secret with a space": lambda _: creds(secret=f"{CANARY} x"),
    "credentials: token with a newline": lambda _: creds(token=f"{CANARY}\n"),
    "env: secret without id": _env({"AWS_SECRET_ACCESS_KEY": CANARY}),
    "env: b2 key without id": _env({"B2_APPLICATION_KEY": CANARY}),
    "env: token alone": _env({"AWS_SESSION_TOKEN": CANARY}),
    "env: secret with newline": _env(
        {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": f"{CANARY}\nx"}
    ),
    "secret dir: secret without id": _secret_files({"AWS_SECRET_ACCESS_KEY": CANARY}),
    "secret dir: inner space": _secret_files(
        {"keyID": KEY_ID, "applicationKey": f"{CANARY} {CANARY}"}
    ),
    "secret dir: binary": _secret_files(
        {"keyID": KEY_ID, "applicationKey": b"\x80" + CANARY.encode()}
    ),
    "secret dir: huge": _secret_files({"keyID": KEY_ID, "applicationKey": CANARY * 5000}),
    "secret dir: other names": _secret_files({"password": CANARY}),
    "env file: no equals": _env_file(f"{CANARY}\n"),
    "env file: unterminated": _env_file(f"AWS_SECRET_ACCESS_KEY='{CANARY}\n"),
    "env file: junk after quote": _env_file(f'AWS_SECRET_ACCESS_KEY="{CANARY}" x\n'),
    "env file: half": _env_file(f"AWS_SECRET_ACCESS_KEY={CANARY}\n"),
    "dvc: line without equals": _dvc_config(f"{_B2_SECTION}    url = s3://b-1/x\n    {CANARY}\n"),
    "dvc: option before section": _dvc_config(f"secret_access_key = {CANARY}\n"),
    "dvc: list value": _dvc_config(TUTORIAL, f"{_B2_SECTION}    secret_access_key = {CANARY}, x\n"),
    "dvc: unterminated quote": _dvc_config(
        TUTORIAL, f"{_B2_SECTION}    secret_access_key = '{CANARY}\n"
    ),
    "dvc: duplicate option": _dvc_config(
        TUTORIAL,
        f"{_B2_SECTION}    secret_access_key = {CANARY}\n    secret_access_key = {CANARY}\n",
    ),
    "dvc: secret without id": _dvc_config(
        TUTORIAL, f"{_B2_SECTION}    secret_access_key = {CANARY}\n"
    ),
    "dvc: secret with space": _dvc_config(
        TUTORIAL, f"{_B2_SECTION}    access_key_id = K\n    secret_access_key = '{CANARY} x'\n"
    ),
    "dvc: token alone": _dvc_config(TUTORIAL, f"{_B2_SECTION}    session_token = {CANARY}\n"),
    "dvc: sse-c key": _dvc_config(TUTORIAL, f"{_B2_SECTION}    sse_customer_key = {CANARY}\n"),
    "dvc: keys in url": _dvc_config(f"{_B2_SECTION}    url = s3://KEYID:{CANARY}@my-bucket/x\n"),
    "dvc: keys in http url": _dvc_config(
        f"{_B2_SECTION}    url = https://u:{CANARY}@dvc.example/x\n"
    ),
    "dvc: keys in endpoint": _dvc_config(
        f"{_B2_SECTION}    url = s3://b-1/x\n    endpointurl = https://K:{CANARY}@s3.example\n"
    ),
    "dvc: secret with a slash in url": _dvc_config(
        f"{_B2_SECTION}    url = s3://KEYID:{CANARY}/x+y@my-bucket/x\n"
    ),
    "url: signature in endpoint query": lambda _: RemoteConfig.from_url(
        "s3://b-1", endpoint_url=f"https://s3.example/?X-Amz-Signature={CANARY}"
    ),
    "url: secret in fragment": lambda _: RemoteConfig.from_url(f"s3://b-1/x#{CANARY}"),
    "chain: nothing anywhere": lambda tmp: ChainCredentials(
        [SecretDirCredentials(_with_file(tmp, "password", CANARY)), EnvCredentials({"X": CANARY})]
    ).get(),
}


def _with_file(directory: Path, name: str, text: str) -> Path:
    (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_no_error_path_shows_a_secret(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(UsageError) as info:
        LEAKS[case](tmp_path)
    assert_no_canary(info.value)
    assert CANARY not in caplog.text
