"""State shared by the REST and gRPC front ends: readiness, metadata, model checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer import __version__
from deployer.serving.config import ServingConfig
from deployer.serving.engine import Engine
from deployer.serving.errors import NotFound, Unavailable
from deployer.serving.jsonlog import AccessLog
from deployer.serving.keys import KeyChecker
from deployer.serving.model import ModelRunner
from deployer.serving.stats import ModelStats

if TYPE_CHECKING:
    from deployer.serving.async_http import AsyncFront

SERVER_NAME = "modelport"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


class ServingApp:
    """The served model plus the server's lifecycle state."""

    def __init__(self, config: ServingConfig, stats: ModelStats, access_log: AccessLog) -> None:
        self.config = config
        self.runner: ModelRunner | None = None
        self.engine: Engine | None = None
        self.stats = stats
        self.access_log = access_log
        self.ready = False
        self.not_ready_reason = "the model is loading"
        self.draining = False
        # Requests received and not yet answered, across REST and gRPC.
        self.inflight = 0
        # Set when --keys-file is given: the adapters call `authorize` once per request.
        self.keys = KeyChecker(Path(config.keys_file)) if config.keys_file else None
        # Set when --async-dir is given: Prefer: respond-async requests are spooled there.
        self.async_front: AsyncFront | None = None
        if config.async_dir:
            from deployer.serving.async_http import AsyncFront

            self.async_front = AsyncFront(self)

    def authorize(self, authorization: str | None) -> str | None:
        """The id of the request's key (None when open or public), for the access log;
        raise Unauthorized/RateLimited unless the key is good."""
        if self.keys is not None:
            return self.keys.check(authorization)
        return None

    @property
    def model(self) -> ModelRunner:
        """The loaded model, or Unavailable while it loads."""
        if self.runner is None:
            raise Unavailable(self.not_ready_reason)
        return self.runner

    @property
    def batcher(self) -> Engine:
        """The engine, or Unavailable while the model loads."""
        if self.engine is None:
            raise Unavailable(self.not_ready_reason)
        return self.engine

    def attach(self, runner: ModelRunner, engine: Engine) -> None:
        """The model is loaded; it is still warming up."""
        self.runner = runner
        self.engine = engine
        self.not_ready_reason = "the model is warming up"

    def mark_ready(self) -> None:
        """Called once the warm-up inference has run."""
        problem = self.model.gpu_problem
        if problem:
            self.ready = False
            self.not_ready_reason = problem
        else:
            self.ready = True
            self.not_ready_reason = ""

    def mark_draining(self) -> None:
        """SIGTERM: report not ready so load balancers stop sending, and finish what is here."""
        self.draining = True
        self.ready = False
        self.not_ready_reason = "the server is shutting down"

    def readiness_error(self) -> str | None:
        """None when ready, else why not."""
        return None if self.ready else self.not_ready_reason

    def check_model(self, name: str, version: str | None) -> None:
        """Raise NotFound unless name/version is the served model."""
        served = self.config.model_name
        if name != served:
            raise NotFound(f"unknown model {name!r}; this server serves {served!r}")
        if version not in (None, "", self.config.model_version):
            raise NotFound(
                f"unknown version {version!r} of model {name!r}; "
                f"this server serves version {self.config.model_version!r}"
            )

    def check_can_infer(self) -> None:
        """Raise Unavailable when inference must be refused (not warmed up, or GPU missing)."""
        problem = self.model.gpu_problem
        if problem:
            raise Unavailable(problem)
        if not self.ready and not self.draining:
            raise Unavailable(self.not_ready_reason)

    def server_metadata(self) -> dict[str, Any]:
        """GET /v2."""
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self) -> dict[str, Any]:
        """GET /v2/models/{m}."""
        runner = self.model
        return {
            "name": runner.name,
            "versions": [runner.version],
            "platform": "onnxruntime_onnx",
            "inputs": [spec.as_metadata() for spec in runner.inputs],
            "outputs": [spec.as_metadata() for spec in runner.outputs],
            "parameters": {
                "execution_providers": runner.providers,
                "max_batch_size": runner.max_batch_size if runner.batchable else 0,
            },
        }

    def model_config(self) -> dict[str, Any]:
        """GET /v2/models/{m}/config, in Triton's model-config JSON form."""
        return self.model.triton_config(self.config.max_queue_delay_us, self.batcher.max_inflight)

    def model_stats(self) -> dict[str, Any]:
        """GET /v2/models/{m}/stats."""
        return {"model_stats": [self.stats.as_triton()]}
