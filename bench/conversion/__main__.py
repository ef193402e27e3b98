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

Then the formats converted only in a container (``--container-only``, on by default
where Docker answers): each converter family's image size and the time to make it
ready, and each format's conversion time in its container, with the ratio to the
joblib regressor's container conversion measured in the same run.
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
from typing import Any

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

_Model = tuple[str, Path, Path | None]


def _models(root: Path) -> list[_Model]:
    models: list[_Model] = []
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


def _container_only_models(client: Any, images: dict[str, str], root: Path) -> list[_Model]:
    """Files of the container-only formats: trees, TensorFlow and transformers models built
    in their own images, a state_dict archive built here (torch is the dev install's extra)."""
    from tests.deployer.convert import tf_models
    from tests.deployer.convert.tree_models import build_in_container

    models: list[_Model] = []
    if "trees" in images:
        trees = build_in_container(client, images["trees"], root / "trees")
        for name in ("xgb_multi.ubj", "lgb_multi.txt", "cb_multi.cbm", "lgb_reg.txt"):
            models.append((f"{name}", trees[name], None))
    if "tensorflow" in images:
        built = build_in_container(
            client, images["tensorflow"], root / "tf", script=tf_models.__file__
        )
        tf_models.saved_model_tar_gz(built["saved"], root / "saved.tar.gz")
        models.append(("model.keras", built["model.keras"], built["sample.npy"]))
        models.append(("SavedModel tar.gz", root / "saved.tar.gz", None))
    if "transformers" in images:
        from tests.deployer.convert import hf_models

        built = build_in_container(
            client, images["transformers"], root / "hf", script=hf_models.__file__
        )
        hf_models.folder_tar_gz(built["bert"], root / "bert.tar.gz")
        models.append(("transformers tar.gz", root / "bert.tar.gz", built["tokens.npz"]))
    if "core" in images:
        try:
            from tests.deployer.convert import state_dict_models as sd

            sd.state_dict_zip(root / "state_dict.zip")
            np.save(root / "sd_sample.npy", sd.sample())
            models.append(("state_dict zip", root / "state_dict.zip", root / "sd_sample.npy"))
        except ImportError:
            print("torch is not installed: the state_dict archive skipped")
    return models


def _container_only(client: Any, repeats: int, root: Path, reference_s: float | None) -> None:
    from deployer.convert.formats import family_of
    from deployer.convert.image import converter_image_ensure
    from deployer.images import ImageConfig

    config = ImageConfig(cache_dir=Path(tempfile.gettempdir()) / "modelport-test-images")
    images: dict[str, str] = {}
    print("\nconverter images (built once per content; 'ready' includes a build when needed)")
    print(f"{'family':<12}{'size MB':>10}{'ready s':>10}  image")
    for family in ("core", "trees", "tensorflow", "transformers"):
        started = time.perf_counter()
        try:
            image = converter_image_ensure(config, family=family, client=client)
        except Exception as exc:
            print(f"{family:<12}{'-':>10}{'-':>10}  not built: {exc}")
            continue
        images[family] = image.ref
        ready = time.perf_counter() - started
        print(f"{family:<12}{image.image.size_bytes / 1e6:>10.0f}{ready:>10.1f}  {image.ref}")
    models = _container_only_models(client, images, root / "models")
    times: dict[str, list[float]] = {}
    for round_number in range(repeats):
        for name, source, sample in models:
            request = _request(source, sample, root / f"c{round_number}")
            sandbox = ContainerSandbox(
                client, images[family_of(request.format)], ContainerLimits(memory_mb=4096)
            )
            seconds = _timed(lambda r=request, s=sandbox: convert_model(r, s))
            times.setdefault(name, []).append(seconds)
            shutil.rmtree(root / f"c{round_number}", ignore_errors=True)
    print(f"\ncontainer-only formats, conversion in the container, median of {repeats} (s)")
    print(f"{'format':<20}{'family':<12}{'median':>8}{'min':>8}{'/joblib':>9}")
    for name, source, _sample in models:
        fmt = resolve(source).format
        assert fmt is not None
        median = statistics.median(times[name])
        ratio = f"{median / reference_s:>9.2f}" if reference_s else f"{'-':>9}"
        print(f"{name:<20}{family_of(fmt):<12}{median:>8.2f}{min(times[name]):>8.2f}{ratio}")


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
    parser.add_argument(
        "--no-container-only",
        action="store_true",
        help="skip the container-only formats (trees, TensorFlow, state_dict)",
    )
    parser.add_argument(
        "--only-container-only",
        action="store_true",
        help="measure only the container-only formats and the converter images",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-conversion-"))
    try:
        if args.only_container_only:
            from deployer.images import docker_client

            _container_only(docker_client(timeout_s=600), args.repeats, root, None)
            return
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
        if "container" in ways and not args.no_container_only:
            reference = statistics.median(times[("joblib regressor", "container")])
            _container_only(client, args.repeats, root / "container-only", reference)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
