"""Run the conversion job in a sandbox: a throwaway container, or a limited child process.

Loading a pickle, a TorchScript archive or a .pt2 program can run code, so that
never happens in the process that calls this module. With a Docker engine the job
runs in a container from the converter image: no network, a non-root user, a
small tmpfs, every capability dropped, no-new-privileges, memory, CPU, process,
disk, log and time limits, and no host folder mounted. The upload (and the sample)
are streamed into the container's own layer before it starts; after it exits only
``model.onnx`` (with its external data) and ``report.json`` are streamed out,
up to the disk allowance, and the container is removed, always.

Without Docker, ONNX and skops files (which load without running code from the
file) are handled in a child process with memory and time limits; the other
formats only when the operator enabled trusted local conversion.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from deployer.convert.archive import TarEntry, extract_flat_folder, tar_stream
from deployer.convert.formats import (
    CODE_EXECUTING,
    CONTAINER_ONLY,
    LABELS,
    ONNX_FORMATS,
    Format,
    family_of,
    safe_alternative,
)
from deployer.convert.job import KNOWN_ANSWER_FILE, PROGRESS_FILE, PROGRESS_MARK, SERVED_FILE
from deployer.convert.report import OPTIONS_FILE, REPORT_FILE, ConversionOptions, ConversionReport
from deployer.errors import DeployerError, LimitExceeded
from deployer.sandbox import HANDLED_ERROR_EXIT, RESULT_FILE, Limits, run_child

# What may come out of a sandbox: the served model, its external data, the report.
_MAX_OUTPUT_FILES = 64
# The container's only writable place besides its volume: a size-capped tmpfs.
_CONTAINER_TMP = "/tmp"  # noqa: S108
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
SANDBOX_UID = 10001
# The converter image's interpreter (``deployer.convert.image``).
_PYTHON = "/opt/convert/bin/python"
_MB = 1024 * 1024
_DISK_POLL_S = 1.0
_MAX_LOG_LINE = 256 * 1024


@dataclass(frozen=True)
class StepEvent:
    """One finished step inside the sandbox (load, convert, check, optimize, quantize)."""

    step: str
    duration_ms: float
    message: str
    data: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[StepEvent], None]


def _ignore(_event: StepEvent) -> None:
    """A step callback that drops everything."""


@dataclass(frozen=True)
class ConversionRequest:
    """One model to convert (or, for ONNX, to optimize) and where the result goes."""

    source: Path
    format: Format
    out_dir: Path
    work_dir: Path
    options: ConversionOptions = field(default_factory=ConversionOptions)
    sample_path: Path | None = None
    known_answer: Path | None = None
    detected: str = ""
    # The newest opset the serving onnxruntime runs (the default opset's ceiling).
    serving_opset: int = 0
    limits: Limits = field(default_factory=lambda: Limits(memory_mb=4096, timeout_s=600))


@dataclass(frozen=True)
class ConversionOutcome:
    """What came out of the sandbox."""

    report: ConversionReport
    model_path: Path
    known_answer_path: Path | None
    sandbox: str
    duration_s: float


class ConversionRefused(DeployerError):
    """This server may not load this format (no container, no trusted local conversion)."""

    code = "conversion_refused"


class Sandbox(Protocol):
    """Where the conversion job runs."""

    name: str

    def run(self, request: ConversionRequest, on_step: StepCallback) -> float:
        """Run the job; leave its outputs in ``request.out_dir``; return seconds taken."""
        ...


class SandboxFactory(Protocol):
    """Builds the container sandbox from the converter image of a family."""

    def __call__(self, family: str = "core") -> ContainerSandbox:
        """The sandbox whose image converts ``family``'s formats."""
        ...


# ---------------------------------------------------------------- choosing a sandbox


def refusal_message(fmt: Format) -> str:
    """Why a format is refused on a server without Docker (and, for most, without trust)."""
    if fmt == Format.TORCH_STATE_DICT:
        return (
            f"A {LABELS[fmt]} runs the uploaded Python source to rebuild the module, which "
            "ModelPort does only in its isolated converter container, and no Docker engine "
            f"answers on this server. Ask the operator to start Docker, or {safe_alternative(fmt)}."
        )
    if fmt in CONTAINER_ONLY:
        return (
            f"{LABELS[fmt]} files are converted only in ModelPort's isolated converter container "
            f"(the {family_of(fmt)!r} converter image holds the framework; the server itself "
            "does not), and no Docker engine answers on this server. Ask the operator to start "
            f"Docker, or {safe_alternative(fmt)}."
        )
    return (
        f"{LABELS[fmt]} files can run code when they are loaded, so ModelPort loads them only "
        "in an isolated container, and no Docker engine answers on this server. Ask the operator "
        "to start Docker (or to enable trusted local conversion with "
        "MODELPORT_CONVERSION_TRUSTED_LOCAL=true, if every uploader is trusted), or "
        f"{safe_alternative(fmt)}."
    )


def choose_sandbox(
    fmt: Format,
    *,
    container: SandboxFactory | None,
    limits: Limits,
    trusted_local: bool,
) -> Sandbox:
    """The container for every converted format when there is one; else what is allowed.

    ``container`` builds the container sandbox of a converter family (None: no Docker
    engine answers).
    """
    if fmt in ONNX_FORMATS:
        return ChildSandbox(limits)
    if container is not None:
        return container(family_of(fmt))
    if fmt in CONTAINER_ONLY:
        raise ConversionRefused(refusal_message(fmt))
    if fmt not in CODE_EXECUTING:
        return ChildSandbox(limits)
    if trusted_local:
        return ChildSandbox(limits, trusted=True)
    raise ConversionRefused(refusal_message(fmt))


def convert_model(
    request: ConversionRequest, sandbox: Sandbox, *, on_step: StepCallback = _ignore
) -> ConversionOutcome:
    """Run the job in ``sandbox`` and read back what it produced."""
    request.out_dir.mkdir(parents=True, exist_ok=True)
    request.work_dir.mkdir(parents=True, exist_ok=True)
    duration = sandbox.run(request, on_step)
    report_path = request.out_dir / REPORT_FILE
    model_path = request.out_dir / SERVED_FILE
    if not report_path.is_file() or not model_path.is_file():
        raise DeployerError(
            "The conversion ended without producing a model and a report.", code="no_output"
        )
    report = ConversionReport.read(report_path)
    known = request.out_dir / KNOWN_ANSWER_FILE
    return ConversionOutcome(
        report=report,
        model_path=model_path,
        known_answer_path=known if known.is_file() else None,
        sandbox=sandbox.name,
        duration_s=duration,
    )


def _job_args(
    request: ConversionRequest,
    *,
    source: str,
    options: str,
    out: str,
    result: str,
    sandbox: str,
    sample: str | None,
    known_answer: str | None,
    scratch: str | None = None,
) -> list[str]:
    args = [
        "--source",
        source,
        "--format",
        request.format.value,
        "--options",
        options,
        "--serving-opset",
        str(request.serving_opset),
        "--detected",
        request.detected[:500],
        "--sandbox",
        sandbox,
        "--out",
        out,
        "--result",
        result,
    ]
    if sample is not None:
        args += ["--sample", sample]
    if known_answer is not None:
        args += ["--known-answer", known_answer]
    if scratch is not None:
        args += ["--scratch", scratch]
    return args


def _limit_message(exc: LimitExceeded, limits: Limits) -> LimitExceeded:
    if exc.code == "timeout":
        return LimitExceeded(
            f"The conversion took longer than its {limits.timeout_s:.0f} s limit and was "
            "stopped. Raise MODELPORT_CONVERSION_TIMEOUT_S if the model really needs longer, or "
            "upload a smaller model.",
            code="timeout",
        )
    return LimitExceeded(
        f"The conversion needed more than its {limits.memory_mb} MB memory limit and was "
        "stopped. Raise MODELPORT_CONVERSION_MEMORY_MB if the model really needs that much.",
        code="out_of_memory",
    )


# ---------------------------------------------------------------- child process


class _ProgressTail:
    """Relays new lines of a progress.jsonl file to a callback.

    Each poll reads once, from where the last complete line ended; a line still being
    written stays unread until its newline arrives, so no line is skipped or cut.
    """

    def __init__(self, path: Path, on_step: StepCallback) -> None:
        self.path, self.on_step, self.offset = path, on_step, 0

    def poll(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return
        complete, newline, _partial = data.rpartition(b"\n")
        if not newline:
            return
        self.offset += len(complete) + 1
        for line in complete.split(b"\n"):
            event = parse_progress(line.decode("utf-8", errors="replace"))
            if event is not None:
                self.on_step(event)


def parse_progress(line: str) -> StepEvent | None:
    """A progress line from the job, or None if it is not one (it came from a sandbox)."""
    try:
        data = json.loads(line.removeprefix(PROGRESS_MARK))
        return StepEvent(
            step=str(data["step"])[:40],
            duration_ms=float(data["duration_ms"]),
            message=str(data.get("message", ""))[:2000],
            data=data.get("data") if isinstance(data.get("data"), dict) else {},
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class ChildSandbox:
    """The job in a child process under ``RLIMIT_AS`` and a wall-clock limit."""

    def __init__(self, limits: Limits, *, trusted: bool = False) -> None:
        self.limits = limits
        self.trusted = trusted
        self.name = "trusted-local" if trusted else "child-process"

    def run(self, request: ConversionRequest, on_step: StepCallback) -> float:
        options = request.work_dir / OPTIONS_FILE
        options.write_text(json.dumps(request.options.to_dict()))
        scratch = request.work_dir / "scratch"
        scratch.mkdir(exist_ok=True)
        tail = _ProgressTail(request.out_dir / PROGRESS_FILE, on_step)
        args = _job_args(
            request,
            source=str(request.source),
            options=str(options),
            out=str(request.out_dir),
            result=str(request.work_dir / RESULT_FILE),
            sandbox=self.name,
            sample=str(request.sample_path) if request.sample_path else None,
            known_answer=str(request.known_answer) if request.known_answer else None,
            scratch=str(scratch),
        )
        try:
            outcome = run_child(
                "deployer.convert.job",
                args,
                work_dir=request.work_dir,
                limits=self.limits,
                on_poll=tail.poll,
                env={"TMPDIR": str(scratch)},
            )
        except LimitExceeded as exc:
            raise _limit_message(exc, self.limits) from None
        finally:
            tail.poll()
            shutil.rmtree(scratch, ignore_errors=True)
        return outcome.duration_s


# ---------------------------------------------------------------- container


@dataclass(frozen=True)
class ContainerLimits:
    """What a conversion container may use."""

    memory_mb: int = 4096
    cpus: float = 1.0
    pids: int = 256
    timeout_s: float = 600.0
    tmpfs_mb: int = 1024
    # What the job may write besides its input (its output and scratch files), and
    # what may come back out: the served model with its external data.
    disk_mb: int = 8192
    # Its log (stdout and stderr), as the engine keeps it and as it is read here.
    log_mb: int = 16


class ContainerSandbox:
    """The job in a throwaway, hardened container from the converter image."""

    name = "container"

    def __init__(
        self,
        client: Any,
        image: str,
        limits: ContainerLimits,
        *,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.image = image
        self.limits = limits
        self.labels = dict(labels or {})

    def run(self, request: ConversionRequest, on_step: StepCallback) -> float:
        work = PurePosixPath("/work")
        sample = f"/work/in/{_sample_name(request)}" if request.sample_path else None
        known = "/work/in/known_answer.npz" if request.known_answer else None
        command = _job_args(
            request,
            source=str(work / "in" / _source_name(request)),
            options=str(work / "in" / OPTIONS_FILE),
            out=str(work / "out"),
            result=str(work / "out" / RESULT_FILE),
            sandbox=self.name,
            sample=sample,
            known_answer=known,
            scratch=_CONTAINER_TMP,
        )
        return self._run(command, _input_entries(request), request.out_dir, on_step)

    def run_module(
        self,
        module: str,
        args: list[str],
        files: dict[str, Path],
        out_dir: Path,
        *,
        on_step: StepCallback = _ignore,
    ) -> float:
        """Run ``python -m module args`` of the converter image on ``files`` (by their
        path under /work/in); its /work/out comes back into ``out_dir``."""
        folders = sorted({str(PurePosixPath(f"in/{n}").parent) for n in files} - {"in"})
        entries = [TarEntry("in"), TarEntry("out"), *(TarEntry(f) for f in folders)]
        entries += [TarEntry(f"in/{name}", path) for name, path in sorted(files.items())]
        return self._run(args, entries, out_dir, on_step, entrypoint=[_PYTHON, "-m", module])

    def _run(
        self,
        command: list[str],
        entries: list[TarEntry],
        out_dir: Path,
        on_step: StepCallback,
        *,
        entrypoint: list[str] | None = None,
    ) -> float:
        from docker.errors import APIError, NotFound

        container = None
        started = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            container = self._create(command, entrypoint)
            container.put_archive("/work", tar_stream(entries, uid=SANDBOX_UID))
            container.start()
            code = self._wait(container, on_step, _input_bytes(entries))
            self._fetch(container, out_dir)
            self._raise_for(container, code, out_dir)
            return time.monotonic() - started
        except APIError as exc:
            raise DeployerError(
                f"The Docker engine refused the sandbox container: {_first_line(exc)}.",
                code="sandbox_failed",
            ) from exc
        finally:
            if container is not None:
                try:
                    container.remove(force=True, v=True)
                except NotFound:
                    pass
                except APIError:
                    # Removal can race the engine's own cleanup; try once more, then leave it
                    # to the label-based sweep (``sweep_containers``).
                    time.sleep(0.5)
                    with contextlib.suppress(APIError, NotFound):
                        container.remove(force=True, v=True)

    def _create(self, command: list[str], entrypoint: list[str] | None = None) -> Any:
        from docker.types import LogConfig, Ulimit

        limits = self.limits
        disk = limits.disk_mb * _MB
        return self.client.containers.create(
            self.image,
            command=command,
            entrypoint=entrypoint,
            name=f"modelport-convert-{uuid.uuid4().hex[:12]}",
            user=f"{SANDBOX_UID}:{SANDBOX_UID}",
            network_mode="none",
            # No volume and no read-only root: the input and the results live in the
            # container's own writable layer, because that is what the engine can measure
            # (``SizeRw``, polled in ``_wait``); a volume has no size cap on this storage
            # driver. The image's files are root's, so the job (uid 10001, no capabilities)
            # can write only to /work, /tmp and the image's world-writable folders.
            tmpfs={_CONTAINER_TMP: f"rw,noexec,nosuid,nodev,size={limits.tmpfs_mb}m,mode=1777"},
            # No single file past the disk allowance, enforced by the kernel at once.
            ulimits=[Ulimit(name="fsize", soft=disk, hard=disk)],
            log_config=LogConfig(
                type="json-file", config={"max-size": f"{limits.log_mb}m", "max-file": "1"}
            ),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=f"{limits.memory_mb}m",
            memswap_limit=f"{limits.memory_mb}m",
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            ipc_mode="none",
            labels={"modelport.role": "converter", **self.labels},
            environment={
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "TMPDIR": _CONTAINER_TMP,
            },
            detach=True,
        )

    def _wait(self, container: Any, on_step: StepCallback, input_bytes: int) -> int:
        deadline = time.monotonic() + self.limits.timeout_s
        follower = _LogFollower(container, self.limits.log_mb * _MB)
        follower.start()
        disk_checked = 0.0
        try:
            while True:
                container.reload()
                state = container.attrs.get("State", {})
                follower.relay(on_step)
                if state.get("Status") in ("exited", "dead"):
                    follower.finish(on_step)
                    return int(state.get("ExitCode", -1))
                if follower.flooded:
                    container.kill()
                    raise LimitExceeded(
                        f"The conversion wrote more than {self.limits.log_mb} MB of log and was "
                        "stopped (MODELPORT_CONVERSION_LOG_MB).",
                        code="log_too_large",
                    )
                if time.monotonic() - disk_checked >= _DISK_POLL_S:
                    disk_checked = time.monotonic()
                    self._check_disk(container, input_bytes)
                if time.monotonic() > deadline:
                    container.kill()
                    raise LimitExceeded(
                        f"The conversion took longer than its {self.limits.timeout_s:.0f} s limit "
                        "and was stopped. Raise MODELPORT_CONVERSION_TIMEOUT_S if the model "
                        "really needs longer, or upload a smaller model.",
                        code="timeout",
                    )
                time.sleep(0.25)
        finally:
            follower.stop()

    def _check_disk(self, container: Any, input_bytes: int) -> None:
        """Stop the container once its writable layer holds more than input + allowance."""
        listed = self.client.api.containers(all=True, size=True, filters={"id": container.id})
        used = int(listed[0].get("SizeRw") or 0) - input_bytes if listed else 0
        if used > self.limits.disk_mb * _MB:
            container.kill()
            raise LimitExceeded(
                f"The conversion wrote more than {self.limits.disk_mb} MB of files and was "
                "stopped (MODELPORT_CONVERSION_DISK_MB).",
                code="disk_full",
            )

    def _fetch(self, container: Any, out_dir: Path) -> None:
        from docker.errors import NotFound

        # The archive endpoint by hand (docker's get_archive gives a generator that
        # cannot close its connection): a stream given up half-read must be closed, or
        # the engine keeps the container locked and the removal below waits for ever.
        api = self.client.api
        response = api._get(
            api._url("/containers/{0}/archive", container.id),
            params={"path": "/work/out"},
            stream=True,
        )
        try:
            api._raise_for_status(response)
        except NotFound:
            response.close()
            return
        try:
            extract_flat_folder(
                response.iter_content(_MB),
                out_dir,
                folder="out",
                max_bytes=self.limits.disk_mb * _MB,
                max_files=_MAX_OUTPUT_FILES,
                name_pattern=_OUTPUT_NAME,
            )
        finally:
            response.close()

    def _raise_for(self, container: Any, code: int, out_dir: Path) -> None:
        if code == 0:
            return
        state = container.attrs.get("State", {})
        result_path = out_dir / RESULT_FILE
        result: dict[str, Any] | None = None
        if result_path.is_file():
            try:
                loaded = json.loads(result_path.read_text())
                result = loaded if isinstance(loaded, dict) else None
            except ValueError:
                result = None
        if code == HANDLED_ERROR_EXIT and result is not None:
            raise DeployerError(
                str(result.get("message", ""))[:4000], code=str(result.get("code", "error"))[:64]
            )
        logs = container.logs(stdout=True, stderr=True, tail=40).decode("utf-8", "replace")
        limits = Limits(memory_mb=self.limits.memory_mb, timeout_s=self.limits.timeout_s)
        if state.get("OOMKilled") or code == 137 or "MemoryError" in logs:
            raise _limit_message(LimitExceeded("", code="out_of_memory"), limits)
        raise DeployerError(
            f"The conversion container failed (exit status {code}). Last output: "
            f"{logs.strip()[-800:] or 'none'}",
            code="crashed",
        )


def _source_name(request: ConversionRequest) -> str:
    return "model" + ("" if request.format != Format.ONNX else ".onnx")


def _sample_name(request: ConversionRequest) -> str:
    assert request.sample_path is not None
    suffix = "".join(request.sample_path.suffixes[-1:])[:10]
    return "sample" + (suffix if suffix.replace(".", "").isalnum() else "")


def _input_entries(request: ConversionRequest) -> list[TarEntry]:
    """in/ (the upload, the sample, options.json) and an empty out/, streamed into /work."""
    entries = [
        TarEntry("in"),
        TarEntry("out"),
        TarEntry(f"in/{_source_name(request)}", request.source),
        TarEntry(f"in/{OPTIONS_FILE}", json.dumps(request.options.to_dict()).encode()),
    ]
    if request.sample_path is not None:
        entries.append(TarEntry(f"in/{_sample_name(request)}", request.sample_path))
    if request.known_answer is not None:
        entries.append(TarEntry("in/known_answer.npz", request.known_answer))
    return entries


def _input_bytes(entries: list[TarEntry]) -> int:
    total = 0
    for entry in entries:
        if isinstance(entry.source, Path):
            total += entry.source.stat().st_size
        elif entry.source is not None:
            total += len(entry.source)
    return total


class _LogFollower:
    """Reads the container's stdout once, as it comes, relaying progress lines, up to a cap.

    One follow stream in a thread (not a re-read of the whole log each poll); the
    events are handed to ``on_step`` on the caller's thread.
    """

    def __init__(self, container: Any, cap_bytes: int) -> None:
        self._container = container
        self._cap = cap_bytes
        self._events: queue.SimpleQueue[StepEvent] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="converter-log")
        self._stream: Any = None
        self.read_bytes = 0
        self.flooded = False

    def start(self) -> None:
        self._thread.start()

    def _follow(self) -> None:
        pending = b""
        skipping = False
        try:
            self._stream = self._container.logs(stdout=True, stderr=False, stream=True, follow=True)
            for chunk in self._stream:
                self.read_bytes += len(chunk)
                if self.read_bytes > self._cap:
                    self.flooded = True
                    return
                if self._stop.is_set():
                    return
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if skipping:
                        skipping = False
                        continue
                    text = line.decode("utf-8", "replace")
                    if text.startswith(PROGRESS_MARK):
                        event = parse_progress(text)
                        if event is not None:
                            self._events.put(event)
                if len(pending) > _MAX_LOG_LINE:
                    # A line this long is no progress line: drop it up to its end.
                    pending, skipping = b"", True
        except Exception:  # the stream ends with the container, however it ends
            return

    def relay(self, on_step: StepCallback) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            on_step(event)

    def finish(self, on_step: StepCallback) -> None:
        """After the container exited: the stream ends by itself; relay what is left."""
        self._thread.join(timeout=10)
        self.relay(on_step)

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()


def sweep_containers(client: Any, *, older_than_s: float = 3600) -> int:
    """Remove conversion containers left behind by a killed worker; return how many."""
    import datetime as dt

    removed = 0
    now = dt.datetime.now(dt.UTC)
    for container in client.containers.list(
        all=True, filters={"label": "modelport.role=converter"}
    ):
        created = str(container.attrs.get("Created", ""))[:19]
        try:
            age = (now - dt.datetime.fromisoformat(created).replace(tzinfo=dt.UTC)).total_seconds()
        except ValueError:
            age = older_than_s + 1
        if age > older_than_s:
            container.remove(force=True, v=True)
            removed += 1
    return removed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A private temporary folder under ``parent``."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
