"""Every manifest the Kubernetes runtime writes is valid for the two newest Kubernetes
minor versions and carries the same hardening as our containers."""

from __future__ import annotations

import pytest
from kube_schemas import newest_two, validate

from deployer.errors import LaunchError
from deployer.runtimes.kube import manifests as m

SETTINGS = m.KubeSettings(installation="abcd1234", registry="registry.test/models")
CPU = m.ServingSpec(
    deployment_id=7,
    revision_id=21,
    model_name="fraud",
    model_version="3",
    image="registry.test/models/modelport-model:fraud-3",
)
SCALING = m.ServingSpec(**{**CPU.__dict__, "min_replicas": 2, "max_replicas": 5})
GPU = m.ServingSpec(**{**CPU.__dict__, "device": "gpu", "gpus": 2})
SPECS = {"cpu": CPU, "autoscaled": SCALING, "gpu": GPU}


@pytest.mark.parametrize("version", newest_two())
@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_manifest_is_valid_for_the_newest_kubernetes(case: str, version: str) -> None:
    objects = m.desired(SETTINGS, SPECS[case])
    assert [o["kind"] for o in objects][:3] == ["NetworkPolicy", "Service", "Deployment"]
    for manifest in objects:
        validate(manifest, version)


def test_two_minor_versions_are_checked() -> None:
    versions = newest_two()
    assert len(versions) == 2
    assert versions[0].split(".")[:2] != versions[1].split(".")[:2]


def test_pods_are_hardened_like_our_containers() -> None:
    pod = m.deployment(SETTINGS, CPU)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # The only writable place is a small in-memory /tmp.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}


def test_readiness_means_the_model_is_warmed_up_and_limits_follow_the_deployment() -> None:
    (container,) = m.deployment(SETTINGS, CPU)["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/fraud/ready"
    assert container["resources"]["limits"] == {"cpu": "1000m", "memory": "1024Mi"}
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    (gpu,) = m.deployment(SETTINGS, GPU)["spec"]["template"]["spec"]["containers"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == "2"


def test_a_rollout_never_goes_below_the_ready_count() -> None:
    strategy = m.deployment(SETTINGS, CPU)["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


def test_the_service_has_rest_and_grpc_and_only_the_gateway_gets_in() -> None:
    service = m.service(SETTINGS, CPU)
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {
        ("http", 8000),
        ("grpc", 8001),
    }
    policy = m.network_policy(SETTINGS, CPU)["spec"]
    assert policy["podSelector"]["matchLabels"] == m.selector(SETTINGS, 7)
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": SETTINGS.gateway_labels}}]
    assert sorted(p["port"] for p in rule["ports"]) == [8000, 8001]


def test_an_autoscaled_deployment_leaves_the_replica_count_to_the_autoscaler() -> None:
    objects = {o["kind"]: o for o in m.desired(SETTINGS, SCALING)}
    assert "replicas" not in objects["Deployment"]["spec"]
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    assert "HorizontalPodAutoscaler" not in {o["kind"] for o in m.desired(SETTINGS, CPU)}
    assert m.deployment(SETTINGS, CPU)["spec"]["replicas"] == 1


def test_the_kserve_variant_uses_our_image_as_a_custom_predictor() -> None:
    settings = m.KubeSettings(installation="abcd1234", kserve=True)
    objects = {o["kind"]: o for o in m.desired(settings, CPU)}
    assert set(objects) == {"NetworkPolicy", "InferenceService"}
    predictor = objects["InferenceService"]["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["image"] == CPU.image
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # A custom resource: no official schema, but the NetworkPolicy still validates.
    for version in newest_two():
        validate(objects["NetworkPolicy"], version)


def test_specs_that_cannot_run_are_refused_with_the_field_named() -> None:
    with pytest.raises(LaunchError, match="Replicas"):
        m.desired(SETTINGS, m.ServingSpec(**{**CPU.__dict__, "min_replicas": 3, "max_replicas": 2}))
    with pytest.raises(LaunchError, match="image"):
        m.desired(SETTINGS, m.ServingSpec(**{**CPU.__dict__, "image": ""}))
    with pytest.raises(LaunchError, match="not a valid Kubernetes object name"):
        m.object_name(m.KubeSettings(installation="UPPER_case"), 1)


def test_the_spec_hash_changes_with_what_is_asked_and_only_then() -> None:
    first, again = m.deployment(SETTINGS, CPU), m.deployment(SETTINGS, CPU)
    key = m.SPEC_HASH
    assert first["metadata"]["annotations"][key] == again["metadata"]["annotations"][key]
    other = m.deployment(SETTINGS, m.ServingSpec(**{**CPU.__dict__, "memory_mb": 2048}))
    assert other["metadata"]["annotations"][key] != first["metadata"]["annotations"][key]


def test_the_schema_check_can_fail() -> None:
    import kubernetes_validate

    broken = m.deployment(SETTINGS, CPU)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    for version in newest_two():
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken, version)
    wrong_type = m.service(SETTINGS, CPU)
    wrong_type["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type, newest_two()[-1])
