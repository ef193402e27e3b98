"""Conversion time per format, and the sandbox's overhead against converting in-process.

    .venv/bin/python -m bench.conversion [--repeats 5]

For each format the same model file is converted three ways, interleaved round by
round so that a noisy shared machine affects them alike:

- in-process: ``deployer.convert.job.run_job`` called in this interpreter (torch and
  sklearn already imported: the converter's own cost only);
- child: the limited child process (what a server without Docker does);
- container: a throwaway hardened container from the converter image (skipped
  when no Docker engine answers).

Prints medians, the overhead in seconds (sandbox minus in-process: mostly a fresh
interpreter importing torch/sklearn) and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deployer.convert.formats import Format, resolve
from deployer.convert.job import run_job
from deployer.convert.onnx_tools import newest_runtime_opset
from deployer.convert.report import ConversionOptions
from deployer.convert.runner import (
    ChildSandbox,
    ContainerLimits,
    ContainerSandbox,
    ConversionRequest,
    Sandbox,
    convert_model,
)
from deployer.sandbox import Limits
from tests.deployer.convert import conversion_models as cm


def _models(root: Path) -> list[tuple[str, Path, Path | None]]:
    models: list[tuple[str, Path, Path | None]] = []
    pipeline = cm.string_label_pipeline()
    cm.skops_file(root / "pipe.skops", pipeline)
    models.append(("skops pipeline", root / "pipe.skops", None))
    cm.pickle_file(root / "pipe.pkl", pipeline)
    models.append(("pickle pipeline", root / "pipe.pkl", None))
    cm.joblib_file(root / "reg.joblib", cm.regressor())
    models.append(("joblib regressor", root / "reg.joblib", None))
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: PyTorch formats skipped (pip install -e '.[torch]')")
        return models
    cm.torchscript_file(root / "model.pt")
    np.savez(root / "sample.npz", **cm.torch_sample())
    models.append(("TorchScript", root / "model.pt", root / "sample.npz"))
    cm.pt2_file(root / "model.pt2")
    models.append((".pt2 program", root / "model.pt2", None))
    return models


def _request(source: Path, sample: Path | None, work: Path) -> ConversionRequest:
    detection = resolve(source)
    return ConversionRequest(
        source=source,
        format=detection.format or Format.PICKLE,
        out_dir=work / "out",
        work_dir=work / "job",
        options=ConversionOptions(),
        sample_path=sample,
        detected=detection.evidence,
        serving_opset=newest_runtime_opset(),
        limits=Limits(memory_mb=4096, timeout_s=600),
    )


def _in_process(request: ConversionRequest) -> None:
    scratch = request.work_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the job's progress lines
        _run_job(request, scratch)


def _run_job(request: ConversionRequest, scratch: Path) -> None:
    run_job(
        source=request.source,
        fmt=request.format,
        options=request.options,
        out_dir=request.out_dir,
        scratch=scratch,
        serving_opset=request.serving_opset,
        sample_path=request.sample_path,
        detected=request.detected,
        sandbox="in-process",
    )


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-conversion-"))
    try:
        models = _models(root)
        ways: dict[str, Callable[[], Sandbox] | None] = {
            "in-process": None,
            "child": lambda: ChildSandbox(Limits(memory_mb=4096, timeout_s=600), trusted=True),
        }
        container_note = ""
        try:
            from deployer.convert.image import converter_image_ensure
            from deployer.images import ImageConfig, docker_client, engine_available

            if engine_available():
                client = docker_client(timeout_s=600)
                started = time.perf_counter()
                image = converter_image_ensure(
                    ImageConfig(cache_dir=Path(tempfile.gettempdir()) / "modelport-test-images"),
                    client=client,
                )
                container_note = (
                    f"converter image {image.ref}: {image.image.size_bytes / 1e6:.0f} MB, "
                    f"ready in {time.perf_counter() - started:.1f} s"
                )
                ways["container"] = lambda: ContainerSandbox(
                    client, image.ref, ContainerLimits(memory_mb=4096)
                )
            else:
                container_note = "no Docker engine: container column skipped"
        except Exception as exc:
            container_note = f"container column skipped: {exc}"
        # Warm this interpreter (imports) so in-process measures the conversion only.
        for _name, source, sample in models:
            _in_process(_request(source, sample, root / "warm"))
            shutil.rmtree(root / "warm", ignore_errors=True)

        times: dict[tuple[str, str], list[float]] = {}
        for round_number in range(args.repeats):
            for name, source, sample in models:
                for way, sandbox in ways.items():
                    work = root / f"r{round_number}-{way}"
                    request = _request(source, sample, work)
                    if sandbox is None:
                        seconds = _timed(lambda request=request: _in_process(request))
                    else:
                        chosen = sandbox()
                        seconds = _timed(
                            lambda request=request, chosen=chosen: convert_model(request, chosen)
                        )
                    times.setdefault((name, way), []).append(seconds)
                    shutil.rmtree(work, ignore_errors=True)

        print(f"conversion time, median of {args.repeats} (seconds); {container_note}")
        header = f"{'format':<18}" + "".join(f"{w:>12}" for w in ways)
        header += f"{'child-in':>10}{'child/in':>10}"
        if "container" in ways:
            header += f"{'cont-in':>10}{'cont/in':>10}{'cont/child':>11}"
        print(header)
        for name, _source, _sample in models:
            medians = {w: statistics.median(times[(name, w)]) for w in ways}
            line = f"{name:<18}" + "".join(f"{medians[w]:>12.2f}" for w in ways)
            base = medians["in-process"]
            line += f"{medians['child'] - base:>10.2f}{medians['child'] / base:>10.1f}"
            if "container" in ways:
                line += (
                    f"{medians['container'] - base:>10.2f}{medians['container'] / base:>10.1f}"
                    f"{medians['container'] / medians['child']:>11.2f}"
                )
            print(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
