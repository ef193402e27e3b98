"""The REST API's behaviour: shapes, errors as {code, detail}, uploads, schema and docs."""

from __future__ import annotations

from pathlib import Path

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings

from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas
from tests.portal.factories import ready_version


def test_create_read_update_model(personas: Personas) -> None:
    client = personas.bob.client()
    created = client.post(
        "/api/v1/models/", {"name": "fraud-detector", "description": "v0"}, format="json"
    )
    assert created.status_code == 201
    assert created.json()["name"] == "fraud-detector"
    assert created.json()["latest_version"] is None
    patched = client.patch(
        "/api/v1/models/fraud-detector/", {"description": "better"}, format="json"
    )
    assert patched.json()["description"] == "better"
    listed = client.get("/api/v1/models/", {"search": "fraud"}).json()
    assert [m["name"] for m in listed] == ["fraud-detector"]
    assert client.get("/api/v1/models/", {"search": "nothing"}).json() == []


def test_invalid_and_duplicate_names_are_explained(personas: Personas) -> None:
    client = personas.bob.client()
    bad = client.post("/api/v1/models/", {"name": "Bad Name!"}, format="json")
    assert bad.status_code == 400
    body = bad.json()
    assert body["code"] == "invalid"
    assert "lower-case letters" in body["detail"]
    assert "name" in body["fields"]
    client.post("/api/v1/models/", {"name": "twice"}, format="json")
    again = client.post("/api/v1/models/", {"name": "twice"}, format="json")
    assert again.status_code == 400
    assert "already exists" in again.json()["detail"]


def test_upload_answers_202_with_the_version(personas: Personas, onnx_file: Path) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    client = personas.bob.client()
    with onnx_file.open("rb") as handle:
        response = client.post(
            "/api/v1/models/demo/versions/", {"file": handle}, format="multipart"
        )
    assert response.status_code == 202
    body = response.json()
    assert body["number"] == 1
    assert body["status"] == "uploaded"
    assert body["size_bytes"] == onnx_file.stat().st_size
    import hashlib

    assert body["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    version = ModelVersion.objects.get()
    assert version.upload_path.read_bytes() == onnx_file.read_bytes()


def test_upload_without_file_and_with_unknown_format(personas: Personas) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    client = personas.bob.client()
    missing = client.post("/api/v1/models/demo/versions/", {}, format="multipart")
    assert missing.status_code == 400
    assert "file" in missing.json()["fields"]
    unknown = client.post(
        "/api/v1/models/demo/versions/",
        {"file": SimpleUploadedFile("m.caffemodel", b"x"), "format": "caffe"},
        format="multipart",
    )
    assert unknown.status_code == 400
    assert "format" in unknown.json()["fields"]


@override_settings(MODELPORT_MAX_UPLOAD_BYTES=1024)
def test_upload_over_the_limit_gets_413_and_leaves_nothing(
    personas: Personas, tmp_path: Path
) -> None:
    from django.conf import settings

    Model.objects.create(team=personas.acme, name="demo")
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    with big.open("rb") as handle:
        response = personas.bob.client().post(
            "/api/v1/models/demo/versions/", {"file": handle}, format="multipart"
        )
    assert response.status_code == 413
    assert response.json()["code"] == "upload_too_large"
    assert "1 MB" in response.json()["detail"] or "0 MB" in response.json()["detail"]
    assert ModelVersion.objects.count() == 0
    incoming = Path(settings.FILE_UPLOAD_TEMP_DIR)
    assert list(incoming.iterdir()) == []


def test_deploying_a_version_that_is_not_ready_is_refused(
    personas: Personas, onnx_file: Path
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    version = ready_version(model, 1, onnx_file)
    ModelVersion.objects.filter(pk=version.pk).update(status="validating")
    response = personas.bob.client().post(
        "/api/v1/models/demo/versions/1/deploy", {"deployment": "production"}, format="json"
    )
    assert response.status_code == 409
    assert response.json() == {
        "code": "version_not_ready",
        "detail": "Version 1 is validating; it can be deployed once it is ready.",
    }


def test_gpu_deploy_on_a_host_without_gpu_says_so(personas: Personas, onnx_file: Path) -> None:
    import onnxruntime

    model = Model.objects.create(team=personas.acme, name="demo")
    ready_version(model, 1, onnx_file)
    response = personas.bob.client().post(
        "/api/v1/models/demo/versions/1/deploy", {"device": "gpu"}, format="json"
    )
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert response.status_code == 202
    else:
        assert response.status_code == 400
        assert response.json()["code"] == "gpu_unavailable"
        assert "no GPU runtime" in response.json()["detail"]


def test_schema_and_docs_are_served_without_a_cdn(personas: Personas) -> None:
    client = personas.bob.client()
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in [
        "/api/v1/models/",
        "/api/v1/models/{name}/versions/",
        "/api/v1/models/{name}/versions/{number}/deploy",
        "/api/v1/deployments/{deployment_id}/rollback",
    ]:
        assert path in paths
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html
    assert "cdn." not in html
    assert "jsdelivr" not in html
    assert "unpkg" not in html
