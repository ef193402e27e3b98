"""The deployment page's try-it form: inputs typed or uploaded, sent to the live endpoint."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from django.core.files.uploadedfile import UploadedFile

from deployer.checks import v2_request
from deployer.errors import InvalidSample
from deployer.samples import Arrays, conform, load_sample
from deployer.signature import Signature

MAX_PREFILL_ELEMENTS = 64
MAX_SHOWN_VALUES = 100


@dataclass(frozen=True)
class InputField:
    """One form field for one model input."""

    name: str
    datatype: str
    shape: list[int]
    example: str


@dataclass
class TryResult:
    """What the endpoint answered, for the result fragment."""

    ok: bool
    latency_ms: float = 0.0
    status: int = 0
    error: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)


def input_fields(signature: dict[str, Any]) -> list[InputField]:
    """A field per input, prefilled with a request-shaped example when it is small."""
    fields = []
    for spec in signature.get("inputs", []):
        shape = [1 if d < 0 else int(d) for d in spec["shape"]]
        count = int(np.prod(shape)) if shape else 1
        example = ""
        if count <= MAX_PREFILL_ELEMENTS:
            value: Any = (
                "text"
                if spec["datatype"] == "BYTES"
                else (False if spec["datatype"] == "BOOL" else 0)
            )
            example = json.dumps(np.full(shape, value, dtype=object).tolist())
        fields.append(
            InputField(name=spec["name"], datatype=spec["datatype"], shape=shape, example=example)
        )
    return fields


def _typed(signature: Signature, values: dict[str, str]) -> Arrays:
    arrays: Arrays = {}
    for spec in signature.inputs:
        text = values.get(spec.name, "").strip()
        if not text:
            raise InvalidSample(f"Type a value for {spec.name}, or upload a file.")
        try:
            arrays[spec.name] = np.array(json.loads(text))
        except ValueError as exc:
            raise InvalidSample(f"{spec.name} is not valid JSON: {exc}") from exc
    return conform(arrays, signature)


def _uploaded(signature: Signature, upload: UploadedFile) -> Arrays:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample"
        with path.open("wb") as out:
            for chunk in upload.chunks():
                out.write(chunk)
        return load_sample(path, signature)


def try_inference(
    *,
    endpoint_url: str,
    signature: dict[str, Any],
    values: dict[str, str],
    upload: UploadedFile | None,
    headers: dict[str, str] | None = None,
) -> TryResult:
    """Send the inputs to the endpoint and time the answer (with the portal's own key)."""
    parsed = Signature.from_dict(signature)
    try:
        arrays = _uploaded(parsed, upload) if upload is not None else _typed(parsed, values)
    except InvalidSample as exc:
        return TryResult(ok=False, error=exc.message)
    started = time.perf_counter()
    try:
        response = requests.post(
            f"{endpoint_url}/infer", json=v2_request(arrays), timeout=30, headers=headers
        )
    except requests.RequestException as exc:
        return TryResult(ok=False, error=f"The endpoint did not answer: {exc}")
    latency = (time.perf_counter() - started) * 1000
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:500]}
    if response.status_code != 200:
        return TryResult(
            ok=False,
            status=response.status_code,
            latency_ms=latency,
            error=str(body.get("error", body)),
        )
    outputs = []
    for output in body.get("outputs", []):
        data = output.get("data", [])
        outputs.append(
            {
                "name": output.get("name"),
                "datatype": output.get("datatype"),
                "shape": output.get("shape"),
                "data": json.dumps(data[:MAX_SHOWN_VALUES]),
                "truncated": len(data) > MAX_SHOWN_VALUES,
            }
        )
    return TryResult(ok=True, status=200, latency_ms=latency, outputs=outputs)
