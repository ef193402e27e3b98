"""The image API's allowlists and pure helpers (no Docker engine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.images.base import apt_mirror
from deployer.images.build import BuildError, layers_above
from deployer.images.model import ModelImageRequest, model_image_ref, serving_config
from deployer.images.names import (
    InvalidImageName,
    check_labels,
    check_reference,
    reference,
    split_reference,
)
from deployer.images.runtime import (
    ONNXRUNTIME_FLOOR,
    ImageConfig,
    RuntimeImage,
    serving_requirements,
)
from deployer.images.wheelhouse import WheelTarget, check_requirement, wheelhouse_key


@pytest.mark.parametrize(
    "ref",
    [
        "python:3.11-slim",
        "modelport/runtime:0.1.0-cpu-0123456789ab",
        "registry.example.com:5000/team/modelport/model:abc",
        "modelport/base:bookworm-python3.11",
        "busybox",
    ],
)
def test_valid_references_pass(ref: str) -> None:
    assert check_reference(ref) == ref


@pytest.mark.parametrize(
    "ref",
    [
        "Model:latest",
        "model:bad tag",
        "model:$(touch /tmp/x)",
        "model;rm -rf /",
        "model:a\nRUN id",
        "../escape:1",
        "model:" + "x" * 200,
        "model@sha256:nothex",
    ],
)
def test_hostile_references_are_refused(ref: str) -> None:
    with pytest.raises(InvalidImageName):
        check_reference(ref)


def test_split_reference_keeps_a_registry_port() -> None:
    assert split_reference("host:5000/repo") == ("host:5000/repo", "")
    assert split_reference("host:5000/repo:tag") == ("host:5000/repo", "tag")
    assert reference("modelport/model", "abc") == "modelport/model:abc"


def test_labels_are_allowlisted() -> None:
    assert check_labels({"modelport.team": "acme"}) == {"modelport.team": "acme"}
    with pytest.raises(InvalidImageName):
        check_labels({"modelport.team": "acme\nRUN id"})
    with pytest.raises(InvalidImageName):
        check_labels({"Bad Key": "x"})


def test_requirements_are_plain_pins() -> None:
    assert check_requirement("onnxruntime==1.32.0") == "onnxruntime==1.32.0"
    assert check_requirement("onnxruntime-gpu[cuda,cudnn]<=1.32.0")
    for bad in ("numpy==1; os_name=='posix'", "--index-url=http://evil", "pkg @ http://x/y.whl"):
        with pytest.raises(BuildError):
            check_requirement(bad)


def test_serving_requirements_pin_what_is_installed_here() -> None:
    from importlib.metadata import version

    cpu = serving_requirements("cpu")
    assert f"onnxruntime=={version('onnxruntime')}" in cpu
    assert f"numpy=={version('numpy')}" in cpu
    assert all("==" in line for line in cpu)
    gpu = serving_requirements("gpu")
    assert f"onnxruntime-gpu[cuda,cudnn]>={ONNXRUNTIME_FLOOR},<={version('onnxruntime')}" in gpu
    assert not any(line.startswith("onnxruntime==") for line in gpu)


def test_the_gpu_image_has_the_same_onnxruntime_floor_as_the_portal() -> None:
    """The second layer under the external-data check holds in the GPU image too."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    [ort] = [d for d in pyproject["project"]["dependencies"] if d.startswith("onnxruntime")]
    assert ort.startswith(f"onnxruntime>={ONNXRUNTIME_FLOOR},"), ort


def test_wheelhouse_key_depends_on_the_set_not_its_order() -> None:
    target = WheelTarget()
    assert wheelhouse_key(["a==1", "b==2"], target) == wheelhouse_key(["b==2", "a==1"], target)
    assert wheelhouse_key(["a==1"], target) != wheelhouse_key(["a==2"], target)
    assert "manylinux_2_28_x86_64" in target.platforms
    assert "manylinux2014_x86_64" in target.platforms


def test_mirror_is_read_from_deb822_and_list_sources(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert apt_mirror("bookworm", (sources,)) == "http://mirror.invalid/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("# comment\ndeb [arch=amd64] http://old.invalid/debian bullseye main\n")
    assert apt_mirror("bullseye", (legacy,)) == "http://old.invalid/debian"
    with pytest.raises(BuildError, match="No APT source"):
        apt_mirror("trixie", (sources, legacy))


def test_model_tag_is_content_addressed(tmp_path: Path) -> None:
    from deployer.images.build import BuiltImage

    built = BuiltImage("modelport/runtime:x", "sha256:1", 1, 1, 0.0, True)
    runtime = RuntimeImage("modelport/runtime:x", "f" * 64, "cpu", "base:1", built)
    config = ImageConfig(cache_dir=tmp_path)
    one = ModelImageRequest(tmp_path / "m.onnx", "a" * 64, runtime, labels={"modelport.v": "1"})
    same = ModelImageRequest(tmp_path / "other.onnx", "a" * 64, runtime)
    other = ModelImageRequest(tmp_path / "m.onnx", "b" * 64, runtime)
    assert model_image_ref(config, one) == model_image_ref(config, same)
    assert model_image_ref(config, one) != model_image_ref(config, other)
    assert model_image_ref(config, one).startswith("modelport/model:aaaaaaaaaaaaaaaa-cpu-")
    with pytest.raises(BuildError):
        model_image_ref(config, ModelImageRequest(tmp_path / "m", "$(id)", runtime))


def test_the_warm_up_sample_is_part_of_the_model_image_content(tmp_path: Path) -> None:
    from deployer.images.build import BuiltImage

    built = BuiltImage("modelport/runtime:x", "sha256:1", 1, 1, 0.0, True)
    runtime = RuntimeImage("modelport/runtime:x", "f" * 64, "cpu", "base:1", built)
    config = ImageConfig(cache_dir=tmp_path)
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    first.write_bytes(b"one sample")
    second.write_bytes(b"another sample")
    bare = ModelImageRequest(tmp_path / "m.onnx", "a" * 64, runtime)
    with_first = ModelImageRequest(tmp_path / "m.onnx", "a" * 64, runtime, warmup_sample=first)
    with_second = ModelImageRequest(tmp_path / "m.onnx", "a" * 64, runtime, warmup_sample=second)
    refs = {model_image_ref(config, r) for r in (bare, with_first, with_second)}
    assert len(refs) == 3
    assert b'"warmup_sample": "/model/warmup.npz"' in serving_config("cpu", {}, warmup=True)
    assert b"warmup_sample" not in serving_config("cpu", {})


def test_serving_config_refuses_unknown_settings() -> None:
    assert b'"model": "/model/model.onnx"' in serving_config("cpu", {"max_batch_size": 8})
    with pytest.raises(BuildError, match="not allowed"):
        serving_config("cpu", {"host": "10.0.0.1", "model": "/etc/passwd"})


def test_layers_above_counts_only_the_new_history() -> None:
    parent = [{"Size": 100}, {"Size": 5}]
    child = [{"Size": 0}, {"Size": 42}, *parent]
    assert layers_above(child, parent) == 42
