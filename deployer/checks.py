"""Readiness and known-answer checks against a serving instance's V2 REST endpoint.

A deployment only counts as running when its instance says it is ready *and*
answers a recorded input with the recorded output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

from deployer.errors import LaunchError
from deployer.samples import Arrays, load_known_answer
from deployer.serving.datatypes import v2_datatype_of


@dataclass(frozen=True)
class Tolerance:
    """How close served floats must be to the recorded ones."""

    rtol: float = 1e-3
    atol: float = 1e-4


def wait_until_ready(
    base_url: str,
    model_name: str,
    *,
    timeout_s: float,
    still_running: Callable[[], bool],
    describe_failure: Callable[[], str],
    headers: Mapping[str, str] | None = None,
) -> float:
    """Poll the model's ready endpoint; return the seconds it took."""
    started = time.monotonic()
    url = f"{base_url}/v2/models/{model_name}/ready"
    while True:
        try:
            if requests.get(url, timeout=2, headers=headers).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        if not still_running():
            raise LaunchError(
                f"The serving instance exited before it was ready. {describe_failure()}"
            )
        if time.monotonic() - started > timeout_s:
            raise LaunchError(
                f"The serving instance was not ready after {timeout_s:.0f} s. {describe_failure()}"
            )
        time.sleep(0.1)


def v2_request(inputs: Arrays) -> dict[str, Any]:
    """A V2 JSON inference request for these arrays."""
    tensors = []
    for name, array in inputs.items():
        if array.dtype.kind in "USO":
            datatype, data = "BYTES", [str(v) for v in array.ravel().tolist()]
        else:
            datatype, data = v2_datatype_of(array), array.ravel().tolist()
        tensors.append(
            {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}
        )
    return {"inputs": tensors}


def check_known_answer(
    base_url: str,
    model_name: str,
    known_answer: Path,
    *,
    tolerance: Tolerance = Tolerance(),
    headers: Mapping[str, str] | None = None,
) -> None:
    """Send the recorded input and compare every output with the recorded one.

    ``headers`` carries the portal's own inference key to a private deployment.
    """
    inputs, expected = load_known_answer(known_answer)
    try:
        response = requests.post(
            f"{base_url}/v2/models/{model_name}/infer",
            json=v2_request(inputs),
            timeout=30,
            headers=headers,
        )
    except requests.RequestException as exc:
        raise LaunchError(f"The known-answer inference could not be sent: {exc}") from exc
    if response.status_code != 200:
        raise LaunchError(
            f"The known-answer inference failed with HTTP {response.status_code}: "
            f"{response.text[:300]}"
        )
    outputs = {item["name"]: item for item in response.json().get("outputs", [])}
    for name, want in expected.items():
        if name not in outputs:
            raise LaunchError(f"The known-answer inference returned no output {name!r}.")
        got = np.array(outputs[name]["data"]).reshape(outputs[name]["shape"])
        _compare(name, got, want, tolerance)


def _compare(
    name: str, got: np.ndarray[Any, Any], want: np.ndarray[Any, Any], tol: Tolerance
) -> None:
    if got.shape != want.shape:
        raise LaunchError(
            f"Output {name} came back with shape {list(got.shape)}, expected {list(want.shape)}."
        )
    if want.dtype.kind == "f":
        if not np.allclose(
            got.astype(np.float64), want.astype(np.float64), rtol=tol.rtol, atol=tol.atol
        ):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise LaunchError(
                f"Output {name} differs from the known answer by up to {worst:.3g} "
                f"(allowed: rtol {tol.rtol}, atol {tol.atol})."
            )
        return
    if want.dtype.kind == "U":
        got = got.astype(str)
    if not np.array_equal(got, want):
        raise LaunchError(f"Output {name} does not match the known answer.")
