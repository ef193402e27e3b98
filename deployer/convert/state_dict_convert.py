"""A PyTorch ``state_dict`` with the source of its module: rebuild the module, then export.

The upload is one archive (.zip or .tar.gz) holding the weights
(``torch.save(model.state_dict(), "weights.pth")``), the module's source file and a
``modelport.json`` manifest that names them::

    {"module": "net.py", "class": "Net", "kwargs": {"hidden": 16},
     "weights": "weights.pth", "inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32"}]}

``weights`` may be left out when the archive holds one ``.pth``/``.pt``/``.bin`` file;
``inputs`` when the upload comes with a sample input. Importing the source runs the
uploader's code, so this module runs only in the converter container. The weights
are read with ``torch.load(weights_only=True)``, which builds tensors and nothing else.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from deployer.convert.archive import extract_archive
from deployer.convert.formats import Format
from deployer.convert.torch_convert import TorchConverter, _first_line, _torch
from deployer.errors import InvalidModel, InvalidSample
from deployer.samples import Arrays
from deployer.signature import Signature

MANIFEST = "modelport.json"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_MANIFEST_HELP = (
    'Add modelport.json to the archive: {"module": "net.py", "class": "Net", "kwargs": {}}.'
)


def _bad(message: str, code: str = "bad_manifest") -> InvalidModel:
    return InvalidModel(f"{message} {_MANIFEST_HELP}", code=code)


class StateDictConverter(TorchConverter):
    """Rebuilds ``class(**kwargs)`` from the source, loads the weights, exports with the
    TorchScript exporter (the module is traced on the example inputs)."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.format = fmt
        self.program = None
        self.output_names: list[str] = []
        torch = _torch()
        torch.set_num_threads(1)
        folder = Path(tempfile.mkdtemp(prefix="state-dict-"))
        files, _total = extract_archive(path, folder / "upload")
        root = _manifest_folder(folder / "upload", files)
        manifest = _read_manifest(root / MANIFEST)
        self.class_name = manifest["class"]
        self.module = self._build(root, manifest)
        weights = _weights_file(root, manifest)
        self._load_weights(weights)
        self.module.eval()
        self.inputs_spec: list[dict[str, Any]] = manifest.get("inputs") or []
        self.input_names = [str(i["name"]) for i in self.inputs_spec] or _forward_names(self.module)

    @property
    def converter(self) -> str:
        return "torch.onnx.export (TorchScript exporter, dynamo=False) of the rebuilt module"

    @property
    def max_opset(self) -> int:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)

    def _build(self, root: Path, manifest: dict[str, Any]) -> Any:
        torch = _torch()
        source = root / manifest["module"]
        if not source.is_file():
            raise _bad(f"The archive has no file {manifest['module']!r} (the manifest's module).")
        # Sibling modules of the source may be imported by it.
        sys.path.insert(0, str(source.parent))
        spec = importlib.util.spec_from_file_location(source.stem, source)
        if spec is None or spec.loader is None:
            raise _bad(f"{manifest['module']!r} is not a Python source file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[source.stem] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the uploader's code raises whatever it raises
            raise InvalidModel(
                f"Importing {manifest['module']} failed: {type(exc).__name__}: {_first_line(exc)}. "
                "The source must import with torch and the standard library only.",
                code="load_failed",
            ) from exc
        cls = getattr(module, manifest["class"], None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise _bad(
                f"{manifest['module']} defines no torch.nn.Module named {manifest['class']!r}."
            )
        try:
            return cls(**manifest.get("kwargs", {}))
        except Exception as exc:
            raise InvalidModel(
                f"{manifest['class']}(**kwargs) failed: {type(exc).__name__}: {_first_line(exc)}. "
                'Give the constructor\'s arguments as "kwargs" in modelport.json.',
                code="load_failed",
            ) from exc

    def _load_weights(self, weights: Path) -> None:
        torch = _torch()
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch.save file, or one holding more than tensors
            raise InvalidModel(
                f"{weights.name} could not be read as a state_dict: {_first_line(exc)}. Save it "
                "with torch.save(model.state_dict(), 'weights.pth').",
                code="load_failed",
            ) from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint
        if not isinstance(state, dict):
            raise InvalidModel(
                f"{weights.name} holds a {type(state).__name__}, not a state_dict.",
                code="load_failed",
            )
        try:
            self.module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InvalidModel(
                f"The weights do not fit {self.class_name}: {_first_line(exc)}. Check the "
                "constructor's kwargs in modelport.json against the model that was trained.",
                code="weights_mismatch",
            ) from exc

    def input_signature(self, sample: Arrays | None, *, dynamic_batch: bool) -> Signature:
        if sample is None and self.inputs_spec:
            sample = self._declared_example()
        if sample is None:
            raise InvalidSample(
                "A state_dict does not record the shapes of the module's inputs. Upload a sample "
                f"input ({', '.join(self.input_names)}), or list the inputs in modelport.json "
                '("inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32"}]).',
                code="sample_required",
            )
        return super().input_signature(sample, dynamic_batch=dynamic_batch)

    def example_inputs(self, sample: Arrays | None) -> tuple[Any, ...]:
        return super().example_inputs(sample if sample is not None else self._declared_example())

    def export(
        self, target: Path, *, opset: int, dynamic_batch: bool, sample: Arrays | None
    ) -> list[str]:
        notes = super().export(
            target,
            opset=opset,
            dynamic_batch=dynamic_batch,
            sample=sample if sample is not None else self._declared_example(),
        )
        return [f"rebuilt {self.class_name} from its source and state_dict", *notes]

    def _declared_example(self) -> Arrays | None:
        if not self.inputs_spec:
            return None
        rng = np.random.default_rng(0)
        example: Arrays = {}
        for spec in self.inputs_spec:
            dtype = np.dtype(str(spec.get("dtype", "float32")))
            shape = tuple(int(d) for d in spec["shape"])
            if dtype.kind == "f":
                example[str(spec["name"])] = rng.standard_normal(shape).astype(dtype)
            else:
                example[str(spec["name"])] = rng.integers(0, 2, shape).astype(dtype)
        return example


def _manifest_folder(folder: Path, files: tuple[str, ...]) -> Path:
    """The folder holding modelport.json: the archive's top, or its one top folder."""
    found = [PurePosixPath(f) for f in files if PurePosixPath(f).name == MANIFEST]
    if not found:
        raise _bad("The archive has no modelport.json.")
    shallowest = min(found, key=lambda p: len(p.parts))
    return folder / shallowest.parent


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"modelport.json is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict):
        raise _bad("modelport.json must be a JSON object.")
    for key in ("module", "class"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise _bad(f"modelport.json has no {key!r}.")
    if not isinstance(manifest.get("kwargs", {}), dict):
        raise _bad('"kwargs" in modelport.json must be an object of constructor arguments.')
    inputs = manifest.get("inputs", [])
    if not isinstance(inputs, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("shape"), list)
        for i in inputs
    ):
        raise _bad('"inputs" in modelport.json must be a list of {"name", "shape", "dtype"}.')
    return manifest


def _weights_file(root: Path, manifest: dict[str, Any]) -> Path:
    named = manifest.get("weights")
    if isinstance(named, str) and named:
        path = root / named
        if not path.is_file():
            raise _bad(f"The archive has no file {named!r} (the manifest's weights).")
        return path
    candidates = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        listed = ", ".join(p.name for p in candidates) or "none"
        raise _bad(
            f'Name the weights file as "weights" in modelport.json (.pth files found: {listed}).'
        )
    return candidates[0]


def _forward_names(module: Any) -> list[str]:
    parameters = inspect.signature(module.forward).parameters.values()
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not names:
        raise _bad('The module\'s forward() takes no named inputs; list them as "inputs".')
    return names
