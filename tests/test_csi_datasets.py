"""The node plugin's view of a volume's Dataset: read from the pod's own namespace over the
API (kmock's emulator, real HTTP), its remote and key names as the operator wrote them, and the
keys picked from the Secret kubelet passes without ever showing one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from datapin_operator.api import models
from datapin_sidecar.csi.datasets import DatasetRemote
from datapin_sidecar.csi.kubeapi import KubeApi, KubeConfig
from datapin_sidecar.errors import AccessRefusedError, BadVolumeError, KubeApiError, Refusal

from testkit.kubeapi import DATASETS, Api, emulator

SECRET = "s3cr3t-Value-that-must-never-show-0123456789"


def _dataset(namespace: str, name: str, **remote: Any) -> dict[str, Any]:
    return {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "remote": {
                "url": "s3://tenant-a/datasets/imagenet",
                "endpoint": "https://s3.us-west-002.backblazeb2.com",
                "credentialsSecretRef": {"name": "b2"},
                **remote,
            }
        },
    }


@pytest.fixture
async def kube() -> AsyncIterator[tuple[Api, KubeApi]]:
    async with emulator() as (_, client), KubeApi(KubeConfig(url=client.url)) as api:
        yield client, api


async def test_dataset_is_read_from_the_pods_namespace_only(kube: tuple[Api, KubeApi]) -> None:
    client, api = kube
    await client.create(DATASETS, _dataset("team-a", "imagenet"))
    found = await api.get_dataset("team-a", "imagenet")
    assert found is not None
    remote = DatasetRemote.from_object(found)
    assert (remote.namespace, remote.name) == ("team-a", "imagenet")
    assert remote.config.bucket == "tenant-a"
    assert remote.config.prefix == "datasets/imagenet"
    assert remote.config.region == "us-west-002"  # from the B2 endpoint
    # Another namespace's pod naming the same Dataset finds nothing.
    assert await api.get_dataset("team-b", "imagenet") is None


async def test_api_errors_name_the_path_and_the_fix() -> None:
    async with emulator() as (k8s, client), KubeApi(KubeConfig(url=client.url)) as api:
        k8s.refuse[("datasets", "team-a")] = 403  # as RBAC refuses
        with pytest.raises(KubeApiError) as caught:
            await api.get_dataset("team-a", "imagenet")
    assert caught.value.status == 403
    assert "datasets/imagenet" in str(caught.value)
    assert "ClusterRole" in str(caught.value)


def test_reader_agrees_with_the_operators_model() -> None:
    """Whatever the operator's Dataset model accepts, the agent reads the same remote."""
    spec = models.DatasetSpec.model_validate(
        {
            "remote": {
                "url": "s3://bucket-1/some/prefix",
                "endpoint": "http://127.0.0.1:8333",
                "region": "eu-central-003",
                "addressing": "path",
                "layout": "legacy",
                "credentialsSecretRef": {
                    "name": "keys",
                    "accessKeyIdKey": "id",
                    "secretAccessKeyKey": "secret",
                },
            }
        }
    )
    obj = {"metadata": {"namespace": "ns", "name": "d"}, "spec": models.dump(spec)}
    remote = DatasetRemote.from_object(obj)
    assert remote.config.bucket == "bucket-1"
    assert remote.config.prefix == "some/prefix"
    assert remote.config.region == "eu-central-003"
    assert remote.config.addressing.value == "path"
    assert remote.layout.value == "legacy"
    assert remote.secret_name == "keys"
    assert (remote.id_keys, remote.secret_keys) == (("id",), ("secret",))
    creds = remote.credentials({"id": "AKIDEXAMPLE", "secret": SECRET, "other": "x"})
    assert creds.access_key_id == "AKIDEXAMPLE"
    assert creds.secret_access_key == SECRET


def test_default_key_names_are_the_sidecars() -> None:
    remote = DatasetRemote.from_object(_dataset("ns", "d"))
    creds = remote.credentials({"keyID": "0021234567890ab0000000001", "applicationKey": SECRET})
    assert creds.secret_access_key == SECRET


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        ({}, "nodePublishSecretRef"),
        ({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE"}, "AWS_SECRET_ACCESS_KEY"),
        ({"unrelated": SECRET}, "AWS_ACCESS_KEY_ID"),
    ],
)
def test_missing_keys_are_refused_without_showing_values(
    secrets: dict[str, str], expected: str
) -> None:
    remote = DatasetRemote.from_object(_dataset("ns", "d"))
    with pytest.raises(AccessRefusedError) as caught:
        remote.credentials(secrets)
    assert caught.value.refusal is Refusal.NO_CREDENTIALS
    assert expected in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "ns/d" in str(caught.value)


@pytest.mark.parametrize(
    "remote",
    [{"url": "file:///etc"}, {"url": "s3://"}, {"addressing": "sideways"}],
)
def test_a_dataset_the_agent_cannot_use_is_a_clear_error(remote: dict[str, Any]) -> None:
    with pytest.raises(BadVolumeError) as caught:
        DatasetRemote.from_object(_dataset("ns", "bad", **remote))
    assert "Dataset ns/bad" in str(caught.value)
    assert "Fix:" in str(caught.value)
