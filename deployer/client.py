"""A small client for ModelPort's REST API, used by the ``modelport`` command."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

FINAL_VERSION = {"ready", "failed"}
FINAL_REVISION = {"live", "failed", "superseded", "stopped"}
FINAL_BATCH = {"succeeded", "failed", "cancelled"}


class ClientError(Exception):
    """The API answered with an error (or could not be reached)."""

    def __init__(self, detail: str, *, code: str = "error", status: int = 0) -> None:
        super().__init__(detail)
        self.detail, self.code, self.status = detail, code, status


class WaitTimeout(ClientError):
    """Something did not reach a final state in time."""


@dataclass
class Client:
    """Talks to one ModelPort server with one API token."""

    url: str
    token: str
    timeout_s: float = 60.0
    poll_s: float = 1.0
    retries: int = 3
    retry_wait_s: float = 1.0

    def _url(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/api/v1/{path.lstrip('/')}"

    def _unreachable(self, exc: Exception) -> ClientError:
        return ClientError(f"Cannot reach ModelPort at {self.url}: {exc}", code="unreachable")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call. Mutating calls carry an Idempotency-Key and are retried with the
        same key when the connection breaks or a proxy answers 502-504, so a retry never
        does the work twice."""
        headers = {"Authorization": f"Token {self.token}", "Accept": "application/json"}
        mutating = method in ("POST", "PATCH", "PUT", "DELETE")
        if mutating:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        timeout = kwargs.pop("timeout", self.timeout_s)
        attempts = self.retries + 1 if mutating or method == "GET" else 1
        for attempt in range(attempts):
            for handle in _file_handles(kwargs):
                handle.seek(0)
            try:
                response = requests.request(
                    method,
                    self._url(path),
                    headers=headers,
                    timeout=timeout,
                    **kwargs,
                )
            except requests.RequestException as exc:
                if attempt + 1 < attempts:
                    time.sleep(self.retry_wait_s * (attempt + 1))
                    continue
                raise self._unreachable(exc) from exc
            if response.status_code in (502, 503, 504) and attempt + 1 < attempts:
                time.sleep(self.retry_wait_s * (attempt + 1))
                continue
            break
        _raise_for_error(response)
        return response.json() if response.content else None

    # ------------------------------------------------------------ models and versions
    def model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"models/{name}/")
        return result

    def model_ensure(self, name: str, description: str = "") -> dict[str, Any]:
        """The model, created first if it does not exist."""
        try:
            return self.model(name)
        except ClientError as exc:
            if exc.status != 404:
                raise
        try:
            created: dict[str, Any] = self._request(
                "POST", "models/", json={"name": name, "description": description}
            )
        except ClientError as exc:
            if exc.status == 400 and "already exists" in exc.detail:
                return self.model(name)  # created by a concurrent push
            raise
        return created

    def versions(self, model: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", f"models/{model}/versions/")
        return result

    def version(self, model: str, number: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"models/{model}/versions/{number}/")
        return result

    def upload(
        self, model: str, file: Path, *, source_format: str = "", sample: Path | None = None
    ) -> dict[str, Any]:
        data = {"format": source_format} if source_format else {}
        with file.open("rb") as model_file:
            files: dict[str, Any] = {"file": (file.name, model_file)}
            if sample is not None:
                files["sample_input"] = (sample.name, sample.open("rb"))
            try:
                result: dict[str, Any] = self._request(
                    "POST",
                    f"models/{model}/versions/",
                    files=files,
                    data=data,
                    timeout=max(self.timeout_s, 3600),
                )
            finally:
                if sample is not None:
                    files["sample_input"][1].close()
        return result

    def wait_version(self, model: str, number: int, *, timeout_s: float) -> dict[str, Any]:
        return _wait(
            lambda: self.version(model, number),
            lambda v: v["status"] in FINAL_VERSION,
            timeout_s=timeout_s,
            poll_s=self.poll_s,
            what=f"{model} v{number}",
        )

    # ------------------------------------------------------------ deployments
    def deploy(
        self,
        model: str,
        number: int,
        *,
        deployment: str,
        device: str,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        gpu_count: int | None = None,
        gpu_ids: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"deployment": deployment, "device": device}
        for field, value in (
            ("min_replicas", min_replicas),
            ("max_replicas", max_replicas),
            ("gpu_count", gpu_count),
            ("gpu_ids", gpu_ids),
        ):
            if value is not None:
                body[field] = value
        result: dict[str, Any] = self._request(
            "POST", f"models/{model}/versions/{number}/deploy", json=body
        )
        return result

    def deployment_update(self, deployment_id: int, **fields: Any) -> dict[str, Any]:
        """PATCH a deployment (``public``, ``min_replicas``, ``max_replicas``)."""
        result: dict[str, Any] = self._request(
            "PATCH", f"deployments/{deployment_id}/", json=fields
        )
        return result

    def deployments(self, model: str | None = None) -> list[dict[str, Any]]:
        params = {"model": model} if model else {}
        result: list[dict[str, Any]] = self._request("GET", "deployments/", params=params)
        return result

    def deployment(self, deployment_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"deployments/{deployment_id}/")
        return result

    def deployment_find(self, model: str, name: str) -> dict[str, Any]:
        for item in self.deployments(model):
            if item["name"] == name:
                return item
        raise ClientError(
            f"{model} has no deployment named {name!r}.", code="not_found", status=404
        )

    def revisions(self, deployment_id: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request(
            "GET", f"deployments/{deployment_id}/revisions/"
        )
        return result

    def rollback(self, deployment_id: int, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "POST", f"deployments/{deployment_id}/rollback", json={"version": version}
        )
        return result

    def logs(self, deployment_id: int, *, tail: int = 200) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "GET", f"deployments/{deployment_id}/logs", params={"tail": tail}
        )
        return result

    # ------------------------------------------------------------ inference keys
    def keys(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "keys/")
        return result

    def key_create(
        self,
        name: str,
        *,
        deployment: int | None = None,
        expires_at: str | None = None,
        rate_per_s: float | None = None,
        burst: int | None = None,
    ) -> dict[str, Any]:
        """A new inference key; the answer's ``key`` is the only time it is shown."""
        body = {
            "name": name,
            "deployment": deployment,
            "expires_at": expires_at,
            "rate_per_s": rate_per_s,
            "burst": burst,
        }
        result: dict[str, Any] = self._request(
            "POST", "keys/", json={k: v for k, v in body.items() if v is not None}
        )
        return result

    def key_revoke(self, key_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"keys/{key_id}/")
        return result

    def follow_logs(self, deployment_id: int, *, tail: int = 200) -> Iterator[str]:
        """The last ``tail`` lines, then each new one while the deployment runs on the same
        instance (the server ends the stream after a rollout or its time limit)."""
        try:
            response = requests.get(
                self._url(f"deployments/{deployment_id}/logs"),
                params={"tail": str(tail), "follow": "true"},
                headers={"Authorization": f"Token {self.token}", "Accept": "text/plain"},
                stream=True,
                timeout=(self.timeout_s, 3600),
            )
        except requests.RequestException as exc:
            raise self._unreachable(exc) from exc
        with response:
            _raise_for_error(response)
            yield from response.iter_lines(decode_unicode=True)

    def wait_revision(
        self, deployment_id: int, revision_id: int, *, timeout_s: float
    ) -> dict[str, Any]:
        def current() -> dict[str, Any]:
            for revision in self.revisions(deployment_id):
                if revision["id"] == revision_id:
                    return revision
            raise ClientError(f"Revision {revision_id} disappeared.", code="not_found")

        return _wait(
            current,
            lambda r: r["status"] in FINAL_REVISION,
            timeout_s=timeout_s,
            poll_s=self.poll_s,
            what=f"the rollout of revision {revision_id}",
        )

    # ------------------------------------------------------------ batch jobs
    def batch_create(
        self,
        model: str,
        number: int,
        file: Path,
        *,
        mapping: dict[str, Any] | None = None,
        chunk_rows: int | None = None,
        max_errors: int | None = None,
    ) -> dict[str, Any]:
        """Upload a dataset and queue its batch job (refused at once on a mapping mismatch)."""
        data: dict[str, Any] = {"model": model, "version": str(number)}
        if mapping:
            data["mapping"] = json.dumps(mapping)
        if chunk_rows is not None:
            data["chunk_rows"] = str(chunk_rows)
        if max_errors is not None:
            data["max_errors"] = str(max_errors)
        with file.open("rb") as handle:
            result: dict[str, Any] = self._request(
                "POST",
                "batch-jobs/",
                files={"file": (file.name, handle)},
                data=data,
                timeout=max(self.timeout_s, 3600),
            )
        return result

    def batch_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"batch-jobs/{job_id}/")
        return result

    def batch_cancel(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"batch-jobs/{job_id}/cancel")
        return result

    def wait_batch(
        self,
        job_id: int,
        *,
        timeout_s: float,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            job = self.batch_job(job_id)
            if on_poll is not None:
                on_poll(job)
            return job

        return _wait(
            fetch,
            lambda j: j["status"] in FINAL_BATCH,
            timeout_s=timeout_s,
            poll_s=self.poll_s,
            what=f"batch job {job_id}",
        )

    def batch_download(self, job_id: int, target: Path) -> int:
        """Stream the job's output into ``target`` (replaced whole); return its bytes."""
        try:
            response = requests.get(
                self._url(f"batch-jobs/{job_id}/output"),
                headers={"Authorization": f"Token {self.token}"},
                stream=True,
                timeout=(self.timeout_s, 3600),
            )
        except requests.RequestException as exc:
            raise self._unreachable(exc) from exc
        scratch = target.with_name(target.name + ".part")
        written = 0
        with response:
            _raise_for_error(response)
            with scratch.open("wb") as out:
                for block in response.iter_content(1 << 20):
                    out.write(block)
                    written += len(block)
        scratch.replace(target)
        return written


def _file_handles(kwargs: dict[str, Any]) -> list[Any]:
    files = kwargs.get("files") or {}
    return [value[1] for value in files.values() if hasattr(value[1], "seek")]


def _wait(
    fetch: Callable[[], dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float,
    poll_s: float,
    what: str,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        current = fetch()
        if done(current):
            return current
        if time.monotonic() > deadline:
            raise WaitTimeout(
                f"Gave up waiting for {what} after {timeout_s:.0f} s.", code="timeout"
            )
        time.sleep(poll_s)


def _raise_for_error(response: requests.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:300] or response.reason}
    raise ClientError(
        str(body.get("detail", body)),
        code=str(body.get("code", "error")),
        status=response.status_code,
    )
