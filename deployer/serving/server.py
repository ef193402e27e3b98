"""Process lifecycle: listen, load, warm up, serve, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployer.serving.app import ServingApp
from deployer.serving.codec import decode_infer_request
from deployer.serving.config import ServingConfig
from deployer.serving.engine import Engine
from deployer.serving.http import HttpServer
from deployer.serving.jsonlog import AccessLog
from deployer.serving.model import ModelRunner, read_warmup_sample
from deployer.serving.stats import ModelStats

log = logging.getLogger("deployer.serving")

EXIT_OK = 0
EXIT_LOAD_FAILED = 2
EXIT_WARMUP_FAILED = 3
EXIT_LISTEN_FAILED = 4


class Server:
    """One serving process: its listeners, its model and its shutdown."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.stats = ModelStats(config.model_name, config.model_version)
        self.access_log = AccessLog(config.access_log)
        self.app = ServingApp(config, self.stats, self.access_log)
        self.http = HttpServer(self.app)
        self.grpc: Any = None
        self.metrics: Any = None
        self.ports: dict[str, int] = {}
        self.public: Any = None  # listen_socket.PublicListeners, with --listen-fds
        self.relay_limits: Any = None  # grpc_relay.RelayLimits of the public gRPC socket
        self._providers: list[str] = []  # filled in when the model has loaded
        self._stop = asyncio.Event()
        self._exit_code = EXIT_OK

    def request_stop(self, exit_code: int = EXIT_OK) -> None:
        """Begin the drain (signal handler, or a fatal startup error)."""
        if self._exit_code == EXIT_OK:
            self._exit_code = exit_code
        self._stop.set()

    async def _listen(self) -> None:
        config = self.config
        self.ports["http_port"] = await self.http.start(config.host, config.http_port)
        if config.grpc_port:
            from deployer.serving.grpc_server import GrpcServer

            self.grpc = GrpcServer(self.app)
            self.ports["grpc_port"] = await self.grpc.start(config.host, config.grpc_port)
        else:
            self.ports["grpc_port"] = 0
        if config.metrics_port:
            from deployer.serving.metrics import MetricsServer, StatsCollector

            collector = StatsCollector(
                self.stats,
                ready=lambda: self.app.ready,
                providers=self._providers,
            )
            self.metrics = MetricsServer(collector)
            self.ports["metrics_port"] = self.metrics.start(config.host, config.metrics_port)
        else:
            self.ports["metrics_port"] = 0
        if config.listen_fds:
            await self._listen_public()

    async def _listen_public(self) -> None:
        from deployer.serving.grpc_relay import GrpcRelay, RelayLimits
        from deployer.serving.http import HttpConnection
        from deployer.serving.listen_socket import PublicListeners

        try:
            self.public = PublicListeners(self.config.listen_fds, self.config.handover)
        except ValueError as exc:
            raise OSError(str(exc)) from exc
        grpc_port = self.ports.get("grpc_port", 0)
        # grpcio cannot serve an inherited socket: relay its connections to our own port.
        host = self.config.host
        if host in ("", "::", "0.0.0.0"):  # noqa: S104 - a comparison, nothing is bound here
            host = "127.0.0.1"
        limits = RelayLimits(self.config.max_connections)
        self.relay_limits = limits

        def relay() -> asyncio.Protocol:
            return GrpcRelay((host, grpc_port), limits)

        await self.public.start_control(
            lambda: HttpConnection(self.http), relay if grpc_port else None
        )

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        started = time.perf_counter()
        try:
            runner = await loop.run_in_executor(None, ModelRunner, config)
        except Exception as exc:
            log.error(
                "cannot load the model: %s",
                exc,
                extra={"event": "load_failed", "model": str(config.model)},
            )
            self.request_stop(EXIT_LOAD_FAILED)
            return
        self._providers[:] = runner.providers
        engine = Engine(
            runner,
            self.stats,
            max_queue_delay_us=config.max_queue_delay_us,
            max_inflight=config.max_inflight_batches,
            max_queue_depth=config.max_queue_depth,
        )
        self.app.attach(runner, engine)
        log.info(
            "model loaded",
            extra={
                "event": "model_loaded",
                "model_name": runner.name,
                "model_version": runner.version,
                "providers": runner.providers,
                "inputs": [spec.as_metadata() for spec in runner.inputs],
                "outputs": [spec.as_metadata() for spec in runner.outputs],
                "load_s": round(time.perf_counter() - started, 3),
            },
        )
        if runner.gpu_problem:
            log.error(runner.gpu_problem, extra={"event": "gpu_unavailable"})
        if config.warmup:
            try:
                feeds = None
                if config.warmup_request:
                    body = Path(config.warmup_request).read_bytes()
                    feeds = decode_infer_request(runner, body, None).feeds
                elif config.warmup_sample:
                    feeds = runner.conform_sample(read_warmup_sample(Path(config.warmup_sample)))
                await loop.run_in_executor(engine.executor, runner.warmup, feeds)
            except Exception as exc:
                given = config.warmup_request or config.warmup_sample
                hint = "" if given else " (a --warmup-request file may help)"
                log.error(
                    "warm-up inference failed: %s%s",
                    exc,
                    hint,
                    extra={"event": "warmup_failed"},
                )
                self.request_stop(EXIT_WARMUP_FAILED)
                return
        self.app.mark_ready()
        log.info(
            "ready" if self.app.ready else "not ready",
            extra={
                "event": "ready" if self.app.ready else "not_ready",
                "reason": self.app.not_ready_reason or None,
                "dynamic_batching": runner.batchable,
                "batch_axes": runner.input_axes if runner.batchable else None,
                "unbatched_reason": None if runner.batchable else runner.unbatched_reason,
                "warmup_input": "request"
                if config.warmup_request
                else "sample"
                if config.warmup_sample
                else "synthetic",
                "max_batch_size": runner.max_batch_size if runner.batchable else 0,
                "max_queue_delay_us": config.max_queue_delay_us,
                "warmup_s": round(time.perf_counter() - started, 3),
            },
        )

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._listen()
        except OSError as exc:
            log.error("cannot listen: %s", exc, extra={"event": "listen_failed"})
            await self._shutdown()
            return EXIT_LISTEN_FAILED
        log.info(
            "listening",
            extra={"event": "listening", "host": self.config.host, **self.ports},
        )
        load = asyncio.create_task(self._load())
        await self._stop.wait()
        if not load.done():
            load.cancel()
        await self._drain()
        return self._exit_code

    async def _drain(self) -> None:
        app = self.app
        app.mark_draining()
        log.info("draining", extra={"event": "draining", "inflight": app.inflight})
        if self.public is not None:
            was_active = self.public.active
            self.public.close()  # the next instance's copy of the sockets keeps accepting
            if was_active:
                # Kept-alive clients get "connection: close" on their next answer and
                # reconnect to the next instance; closing idle connections at once would
                # race with a request being sent on one. gRPC clients get a GOAWAY from
                # the relay and leave once their calls are answered.
                waits = [asyncio.sleep(min(1.0, self.config.drain_timeout_s))]
                if self.relay_limits is not None:
                    waits.append(self._drain_relays())
                await asyncio.gather(*waits)
        self.http.stop_accepting()
        deadline = time.monotonic() + self.config.drain_timeout_s
        grpc_stop = None
        if self.grpc is not None:
            grpc_stop = asyncio.ensure_future(self.grpc.stop(self.config.drain_timeout_s))
        while time.monotonic() < deadline:
            engine = app.engine
            if app.inflight <= 0 and (engine is None or not engine.busy):
                break
            await asyncio.sleep(0.01)
        # Answers written just now need a moment to leave the socket buffers.
        await asyncio.sleep(0.05)
        if grpc_stop is not None:
            await grpc_stop
        await self._shutdown()
        log.info(
            "stopped",
            extra={"event": "stopped", "unanswered": max(app.inflight, 0)},
        )
        self.access_log.flush()

    async def _drain_relays(self) -> None:
        assert self.relay_limits is not None
        forced = await self.relay_limits.drain(self.config.drain_timeout_s)
        if forced:
            log.warning(
                "gRPC connections closed with calls still open",
                extra={"event": "relay_forced_close", "connections": forced},
            )

    async def _shutdown(self) -> None:
        self.http.close_all()
        if self.metrics is not None:
            self.metrics.stop()
        if self.app.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.app.engine.shutdown)
        self.access_log.flush()


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when it is installed and wanted, else None (asyncio's own)."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(config: ServingConfig) -> int:
    """Run a server for `config` in this process; returns the exit code."""
    with asyncio.Runner(loop_factory=loop_factory(config.uvloop)) as runner:
        return runner.run(Server(config).run())
