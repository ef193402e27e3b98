"""Run the conversion job in a sandbox: a throwaway container, or a limited child process.

Loading a pickle, a TorchScript archive or a .pt2 program can run code, so that
never happens in the process that calls this module. With a Docker engine the job
runs in a container from the converter image: no network, a non-root user, a
read-only root with a small tmpfs, every capability dropped, no-new-privileges,
memory, CPU, process and time limits, and no host folder mounted. The upload
(and the sample) are copied into a private volume before the container starts;
after it exits only ``model.onnx`` (with its external data) and ``report.json``
are copied out, and the container and its volume are removed, always.

Without Docker, ONNX and skops files (which load without running code from the
file) are handled in a child process with memory and time limits; the other
formats only when the operator enabled trusted local conversion.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from deployer.convert.formats import CODE_EXECUTING, LABELS, ONNX_FORMATS, Format
from deployer.convert.job import KNOWN_ANSWER_FILE, PROGRESS_FILE, PROGRESS_MARK, SERVED_FILE
from deployer.convert.report import OPTIONS_FILE, REPORT_FILE, ConversionOptions, ConversionReport
from deployer.errors import DeployerError, LimitExceeded
from deployer.sandbox import HANDLED_ERROR_EXIT, RESULT_FILE, Limits, run_child

# What may come out of a sandbox: the served model, its external data, the report.
_MAX_OUTPUT_FILES = 64
# The container's only writable place besides its volume: a size-capped tmpfs.
_CONTAINER_TMP = "/tmp"  # noqa: S108
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


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


# ---------------------------------------------------------------- choosing a sandbox


def refusal_message(fmt: Format) -> str:
    """Why a format is refused on a server without Docker and without trusted conversion."""
    return (
        f"{LABELS[fmt]} files can run code when they are loaded, so ModelPort loads them only "
        "in an isolated container, and no Docker engine answers on this server. Ask the operator "
        "to start Docker (or to enable trusted local conversion with "
        "MODELPORT_CONVERSION_TRUSTED_LOCAL=true, if every uploader is trusted), or upload the "
        "model as ONNX or as a skops file (skops.io.dump)."
    )


def choose_sandbox(
    fmt: Format,
    *,
    container: Callable[[], Sandbox] | None,
    limits: Limits,
    trusted_local: bool,
) -> Sandbox:
    """The container for every converted format when there is one; else what is allowed.

    ``container`` builds the container sandbox (None: no Docker engine answers).
    """
    if fmt in ONNX_FORMATS:
        return ChildSandbox(limits)
    if container is not None:
        return container()
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
    """Relays new lines of a progress.jsonl file to a callback."""

    def __init__(self, path: Path, on_step: StepCallback) -> None:
        self.path, self.on_step, self.seen = path, on_step, 0

    def poll(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        complete = lines if self.path.read_text().endswith("\n") else lines[:-1]
        for line in complete[self.seen :]:
            event = parse_progress(line)
            if event is not None:
                self.on_step(event)
        self.seen = max(self.seen, len(complete))


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
        from docker.errors import APIError, NotFound

        container = None
        started = time.monotonic()
        try:
            container = self._create(request)
            container.put_archive("/work", _input_archive(request))
            container.start()
            code = self._wait(container, on_step)
            self._fetch(container, request.out_dir)
            self._raise_for(container, code, request)
            return time.monotonic() - started
        except APIError as exc:
            raise DeployerError(
                f"The Docker engine refused the conversion container: {_first_line(exc)}.",
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

    def _create(self, request: ConversionRequest) -> Any:
        from docker.types import Mount

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
        limits = self.limits
        return self.client.containers.create(
            self.image,
            command=command,
            name=f"modelport-convert-{uuid.uuid4().hex[:12]}",
            user="10001:10001",
            network_mode="none",
            read_only=True,
            tmpfs={_CONTAINER_TMP: f"rw,noexec,nosuid,nodev,size={limits.tmpfs_mb}m,mode=1777"},
            # A private anonymous volume (not a host folder) for the file going in and
            # the results coming out; removed with the container.
            mounts=[Mount(target="/work", source=None, type="volume")],
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

    def _wait(self, container: Any, on_step: StepCallback) -> int:
        deadline = time.monotonic() + self.limits.timeout_s
        seen = 0
        while True:
            container.reload()
            state = container.attrs.get("State", {})
            seen = self._relay(container, on_step, seen)
            if state.get("Status") in ("exited", "dead"):
                return int(state.get("ExitCode", -1))
            if time.monotonic() > deadline:
                container.kill()
                raise LimitExceeded(
                    f"The conversion took longer than its {self.limits.timeout_s:.0f} s limit and "
                    "was stopped. Raise MODELPORT_CONVERSION_TIMEOUT_S if the model really needs "
                    "longer, or upload a smaller model.",
                    code="timeout",
                )
            time.sleep(0.25)

    @staticmethod
    def _relay(container: Any, on_step: StepCallback, seen: int) -> int:
        text = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
        events = [line for line in text.splitlines() if line.startswith(PROGRESS_MARK)]
        for line in events[seen:]:
            event = parse_progress(line)
            if event is not None:
                on_step(event)
        return max(seen, len(events))

    def _fetch(self, container: Any, out_dir: Path) -> None:
        from docker.errors import NotFound

        try:
            stream, _stat = container.get_archive("/work/out")
        except NotFound:
            return
        data = b"".join(stream)
        _extract_outputs(data, out_dir)

    def _raise_for(self, container: Any, code: int, request: ConversionRequest) -> None:
        if code == 0:
            return
        state = container.attrs.get("State", {})
        result_path = request.out_dir / RESULT_FILE
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


def _input_archive(request: ConversionRequest) -> bytes:
    """A tar of in/ (the upload, the sample, options.json) and an empty out/, owned by the user."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for folder in ("in", "out"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            info.uid = info.gid = 10001
            archive.addfile(info)
        files: list[tuple[str, bytes | Path]] = [
            (f"in/{_source_name(request)}", request.source),
            (f"in/{OPTIONS_FILE}", json.dumps(request.options.to_dict()).encode()),
        ]
        if request.sample_path is not None:
            files.append((f"in/{_sample_name(request)}", request.sample_path))
        if request.known_answer is not None:
            files.append(("in/known_answer.npz", request.known_answer))
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid = 0o644, 10001, 10001
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as handle:
                    archive.addfile(info, handle)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _extract_outputs(data: bytes, out_dir: Path) -> None:
    """Take only plain files directly under out/ from the container's archive."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        count = 0
        for member in archive:
            parts = PurePosixPath(member.name).parts
            if len(parts) != 2 or parts[0] != "out" or not member.isreg():
                continue
            name = parts[1]
            if not _OUTPUT_NAME.match(name):
                continue
            count += 1
            if count > _MAX_OUTPUT_FILES:
                raise DeployerError(
                    "The conversion container wrote too many files.", code="sandbox_failed"
                )
            source = archive.extractfile(member)
            if source is None:
                continue
            with source, (out_dir / name).open("wb") as target:
                shutil.copyfileobj(source, target)


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
