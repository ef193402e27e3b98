"""What scores a chunk: the version's serving runtime over V2 REST (binary tensors), or
onnxruntime in this process (the benchmark's baseline and tests of the job logic).

:func:`serving_instance` is the whole operation of bringing a runtime's instance up
for a job: clear what an interrupted run of the job left, start it with a key only
this run knows, wait until it is ready, and stop it when the job ends.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deployer.checks import wait_until_ready
from deployer.errors import DeployerError, LaunchError
from deployer.keys import KEYS_FILE_NAME, KeyEntry, KeySet, key_sha256, write_keys_file
from deployer.runtimes.base import InstanceState, LaunchResult, LaunchSpec, Runtime
from deployer.signature import Signature

# A request larger than this is split (the runtime refuses bodies over 64 MiB by default).
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class RowsRefused(DeployerError):
    """The model refused the rows of one request (a value it cannot take)."""

    code = "rows_refused"


class ScoringError(DeployerError):
    """The runtime could not be reached or failed; the job stops (and may be resumed)."""

    code = "scoring_failed"


class Scorer(Protocol):
    """Runs model inputs (first axis: rows) and returns every output by name."""

    signature: Signature
    # Rows per request the runtime takes at once (1 for a model without a batch axis).
    max_rows: int

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class OnnxScorer:
    """onnxruntime in this process."""

    def __init__(self, model_path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        from deployer.signature import session_signature

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.signature = session_signature(self.session)
        self.max_rows = 1 << 30 if self.signature.dynamic_batch else 1
        self._names = [s.name for s in self.signature.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(self._names, feeds)
        except Exception as exc:  # onnxruntime raises its own untyped errors per request
            raise RowsRefused(str(exc).splitlines()[0][:500]) from exc
        return dict(zip(self._names, (np.asarray(o) for o in outputs), strict=True))

    def close(self) -> None:
        return None


class V2Scorer:
    """A serving instance over the Open Inference Protocol's REST binary tensor extension."""

    def __init__(
        self,
        url: str,
        model_name: str,
        signature: Signature,
        *,
        headers: dict[str, str] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        import tritonclient.http as httpclient

        self._http = httpclient
        self.client = httpclient.InferenceServerClient(
            url.split("://", 1)[-1],
            connection_timeout=timeout_s,
            network_timeout=timeout_s,
        )
        self.model_name = model_name
        self.signature = signature
        self.headers = dict(headers or {})
        self.max_rows = 1 << 30 if signature.dynamic_batch else 1

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        inputs = []
        for spec in self.signature.inputs:
            array = feeds[spec.name]
            item = self._http.InferInput(spec.name, list(array.shape), spec.datatype)
            item.set_data_from_numpy(array, binary_data=True)
            inputs.append(item)
        wanted = [
            self._http.InferRequestedOutput(s.name, binary_data=True)
            for s in self.signature.outputs
        ]
        try:
            result = self.client.infer(
                self.model_name, inputs, outputs=wanted, headers=self.headers
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if status == "400":
                raise RowsRefused(str(exc.message())[:500]) from exc
            raise ScoringError(f"The serving instance failed a request: {exc}") from exc
        except OSError as exc:
            raise ScoringError(f"The serving instance did not answer: {exc}") from exc
        outputs: dict[str, np.ndarray] = {}
        for spec in self.signature.outputs:
            outputs[spec.name] = np.asarray(result.as_numpy(spec.name))
        return outputs

    def close(self) -> None:
        self.client.close()


def rows_per_request(signature: Signature, feeds: dict[str, np.ndarray], max_rows: int) -> int:
    """How many rows one request carries: what fits ``MAX_REQUEST_BYTES``, at most ``max_rows``."""
    rows = next(iter(feeds.values())).shape[0] if feeds else 0
    if rows == 0:
        return 1
    row_bytes = sum(max(a.nbytes // rows, 1) for a in feeds.values())
    return max(1, min(max_rows, MAX_REQUEST_BYTES // row_bytes))


@dataclass(frozen=True)
class InstanceRequest:
    """A serving instance for one batch job: ``job_id`` labels it (as a revision id would)."""

    job_id: int
    model_name: str
    model_version: str
    model_path: Path
    image: str
    work_dir: Path
    cpus: float = 1.0
    memory_mb: int = 1024
    ready_timeout_s: float = 180.0


@contextmanager
def serving_instance(
    runtime: Runtime, request: InstanceRequest
) -> Iterator[tuple[LaunchResult, dict[str, str]]]:
    """Start the job's instance and yield its address and the headers to call it with.

    An instance an interrupted run of the same job left behind is stopped first; the
    one started here is stopped when the block ends, however it ends.
    """
    for instance in runtime.owned():
        if instance.revision_id == request.job_id:
            runtime.stop(instance.handle, grace_s=1)
    key = secrets.token_urlsafe(32)
    keys_file = request.work_dir / "keys" / KEYS_FILE_NAME
    write_keys_file(keys_file, KeySet(keys=(KeyEntry(id="batch", sha256=key_sha256(key)),)))
    headers = {"Authorization": f"Bearer {key}"}
    launch = runtime.start(
        LaunchSpec(
            deployment_id=0,
            revision_id=request.job_id,
            model_name=request.model_name,
            model_version=request.model_version,
            model_path=request.model_path,
            image=request.image,
            cpus=request.cpus,
            memory_mb=request.memory_mb,
            labels={"modelport.batch-job": str(request.job_id)},
            keys_file=keys_file,
        )
    )
    try:
        wait_until_ready(
            launch.url,
            request.model_name,
            timeout_s=request.ready_timeout_s,
            still_running=lambda: runtime.status(launch.handle).state == InstanceState.RUNNING,
            describe_failure=lambda: runtime.logs(launch.handle, tail=15).strip()[-1500:],
            headers=headers,
        )
        yield launch, headers
    finally:
        with suppress(LaunchError):
            runtime.stop(launch.handle, grace_s=2)


def merge_outputs(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Outputs of consecutive requests, joined along the rows."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
