"""The Kubernetes runtime's own small pieces that need no cluster."""

from __future__ import annotations

import pytest

from deployer.errors import LaunchError
from deployer.runtimes.kube.runtime import Handle, push_image


def test_a_handle_names_namespace_deployment_and_revision_and_reads_back() -> None:
    handle = Handle("modelport-serving", "mp-abcd1234-d7", "21")
    assert str(handle) == "modelport-serving/mp-abcd1234-d7@21"
    assert Handle.parse(str(handle)) == handle
    with pytest.raises(LaunchError, match="not a Kubernetes instance handle"):
        Handle.parse("0123456789ab")


def test_pushing_without_a_registry_says_which_setting_is_missing() -> None:
    with pytest.raises(LaunchError, match="MODELPORT_KUBE_REGISTRY is not set"):
        push_image("modelport-model:abc", "")
