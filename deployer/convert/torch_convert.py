"""PyTorch to ONNX: TorchScript archives and torch.export programs (.pt2).

Runs only inside the sandbox: ``torch.jit.load`` and ``torch.export.load`` read
files that can carry code. torch is the optional ``torch`` extra.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from deployer.convert.formats import Format, torch_install_command
from deployer.errors import DeployerError, InvalidModel, InvalidSample
from deployer.samples import Arrays
from deployer.signature import V2_TO_NUMPY, Signature, TensorSpec


def torch_missing() -> str:
    """Why a PyTorch upload cannot be converted here, and the command that fixes it."""
    return (
        "PyTorch uploads need PyTorch where the conversion runs, and it is not installed there. "
        "Start a Docker engine so ModelPort converts in its own container, or install the torch "
        f"extra next to the worker: {torch_install_command()} (a CPU build of torch==2.13.0)."
    )


# numpy dtype names ("float32") -> V2 datatype.
NUMPY_TO_V2 = {np.dtype(dtype).name: v2 for v2, dtype in V2_TO_NUMPY.items()}


class ConversionUnavailable(DeployerError):
    """The converter this format needs is not installed where conversion runs."""

    code = "converter_missing"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConversionUnavailable(torch_missing(), code="torch_missing") from None
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


def output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _flatten(value: Any) -> list[Any]:
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten(value)
    return list(leaves)


def _to_numpy(value: Any) -> np.ndarray[Any, Any]:
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


class TorchConverter:
    """Loads a TorchScript or .pt2 file, exports it to ONNX and runs the original."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.format = fmt
        torch = _torch()
        torch.set_num_threads(1)
        try:
            if fmt == Format.TORCHSCRIPT:
                self.module = torch.jit.load(str(path), map_location="cpu")
                self.module.eval()
                self.program = None
                self.input_names = self._script_input_names()
            else:
                self.program = torch.export.load(str(path))
                self.module = self.program.module()
                self.input_names = list(self.program.graph_signature.user_inputs)
        except (ConversionUnavailable, MemoryError):
            raise
        except Exception as exc:  # torch raises RuntimeError, pickle and zip errors alike
            kind = "TorchScript archive" if fmt == Format.TORCHSCRIPT else ".pt2 program"
            raise InvalidModel(
                f"PyTorch could not load the {kind}: {_first_line(exc)}. If the file was cut "
                "short, upload it again; it must come from "
                + ("torch.jit.save." if fmt == Format.TORCHSCRIPT else "torch.export.save."),
                code="load_failed",
            ) from exc
        self.output_names: list[str] = []

    @property
    def converter(self) -> str:
        if self.format == Format.TORCHSCRIPT:
            return "torch.onnx.export (TorchScript exporter, dynamo=False)"
        return "torch.onnx.export (torch.export exporter, dynamo=True)"

    @property
    def max_opset(self) -> int:
        from torch.onnx import _constants

        if self.format == Format.TORCHSCRIPT:
            return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
        return int(_constants.ONNX_MAX_OPSET)

    def versions(self) -> dict[str, str]:
        torch = _torch()
        found = {"torch": str(torch.__version__)}
        with contextlib.suppress(ImportError):
            import onnxscript

            found["onnxscript"] = str(onnxscript.__version__)
        return found

    def _script_input_names(self) -> list[str]:
        names: list[str] = []
        for value in list(self.module.graph.inputs())[1:]:  # the first is ``self``
            names.append(re.sub(r"\.\d+$", "", value.debugName()) or f"input_{len(names)}")
        if not names:
            raise InvalidModel(
                "The TorchScript module's forward() takes no inputs.", code="no_inputs"
            )
        return names

    # ------------------------------------------------------------ inputs

    def input_signature(self, sample: Arrays | None, *, dynamic_batch: bool) -> Signature:
        """The inputs as ONNX will see them, from the program or from the sample."""
        if self.program is not None:
            return Signature(inputs=tuple(self._program_inputs()))
        if sample is None:
            names = ", ".join(self.input_names)
            raise InvalidSample(
                "A TorchScript archive does not record the shapes of its inputs. Upload a sample "
                f"input with the model: an .npz with one array per input ({names}), or a .npy "
                "for a single input.",
                code="sample_required",
            )
        missing = [n for n in self.input_names if n not in sample]
        if missing:
            raise InvalidSample(
                f"The sample has no array for {', '.join(missing)}; the TorchScript module's "
                f"inputs are {', '.join(self.input_names)}."
            )
        specs = []
        for name in self.input_names:
            array = sample[name]
            datatype = NUMPY_TO_V2.get(array.dtype.name)
            if datatype is None or datatype == "BYTES":
                raise InvalidSample(f"Input {name} must be numbers, got {array.dtype}.")
            shape = tuple(
                -1 if axis == 0 and dynamic_batch else int(d) for axis, d in enumerate(array.shape)
            )
            specs.append(TensorSpec(name=name, datatype=datatype, shape=shape))
        return Signature(inputs=tuple(specs))

    def _program_inputs(self) -> list[TensorSpec]:
        torch = _torch()
        assert self.program is not None
        by_name = {n.name: n for n in self.program.graph.nodes if n.op == "placeholder"}
        specs = []
        for name in self.input_names:
            value = by_name[name].meta.get("val")
            if not isinstance(value, torch.Tensor):
                raise InvalidModel(
                    f"The program's input {name} is not a tensor; only tensor inputs can be "
                    "served. Export a wrapper whose forward() takes tensors.",
                    code="unsupported_input",
                )
            datatype = NUMPY_TO_V2.get(str(value.dtype).removeprefix("torch."))
            if datatype is None:
                raise InvalidModel(
                    f"Input {name} has dtype {value.dtype}, which the inference protocol lacks.",
                    code="unsupported_input",
                )
            shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            specs.append(TensorSpec(name=name, datatype=datatype, shape=shape))
        return specs

    def example_inputs(self, sample: Arrays | None) -> tuple[Any, ...]:
        torch = _torch()
        if sample is not None:
            return tuple(
                torch.from_numpy(np.ascontiguousarray(sample[n])) for n in self.input_names
            )
        assert self.program is not None
        assert self.program.example_inputs is not None
        args, kwargs = self.program.example_inputs
        return tuple(_flatten((args, kwargs)))

    # ------------------------------------------------------------ export and run

    def export(
        self, target: Path, *, opset: int, dynamic_batch: bool, sample: Arrays | None
    ) -> list[str]:
        """Write the ONNX model; return notes for the report."""
        torch = _torch()
        notes: list[str] = []
        self.input_signature(sample, dynamic_batch=dynamic_batch)  # a TorchScript needs a sample
        example = self.example_inputs(sample)
        with torch.no_grad():
            count = len(_flatten(self._call(example)))
        self.output_names = output_names(count)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                if self.program is None:
                    self._export_script(target, example, opset, dynamic_batch)
                else:
                    notes += self._export_program(target, opset, dynamic_batch)
        except (DeployerError, MemoryError):
            raise
        except Exception as exc:  # the exporters raise many types; the text names the operator
            raise InvalidModel(
                f"torch.onnx.export could not convert the model at opset {opset}: "
                f"{_first_line(exc)}. An operator without an ONNX equivalent needs a different "
                "implementation (or a newer opset); see the conversion log in the report.",
                code="unsupported_operator",
            ) from exc
        return notes

    def _export_script(
        self, target: Path, example: tuple[Any, ...], opset: int, dynamic_batch: bool
    ) -> None:
        torch = _torch()
        axes = None
        if dynamic_batch:
            axes = {name: {0: "batch"} for name in self.input_names + self.output_names}
        torch.onnx.export(
            self.module,
            example,
            str(target),
            dynamo=False,
            input_names=self.input_names,
            output_names=self.output_names,
            dynamic_axes=axes,
            opset_version=opset,
        )

    def _export_program(self, target: Path, opset: int, dynamic_batch: bool) -> list[str]:
        torch = _torch()
        assert self.program is not None
        notes = []
        fixed = [s for s in self._program_inputs() if s.shape and s.shape[0] != -1]
        if dynamic_batch and fixed:
            notes.append(
                "The .pt2 program was exported with a fixed batch size "
                f"({', '.join(f'{s.name}: {s.shape[0]}' for s in fixed)}), so the ONNX model keeps "
                "it. Export with dynamic_shapes={'x': {0: torch.export.Dim('batch')}} to serve any "
                "batch size."
            )
        program = torch.onnx.export(
            self.program,
            dynamo=True,
            opset_version=opset,
            input_names=self.input_names,
            output_names=self.output_names,
            optimize=True,
        )
        program.save(str(target))
        return notes

    def _call(self, args: tuple[Any, ...]) -> Any:
        if self.program is not None:
            from torch.utils import _pytree as pytree

            call_args, call_kwargs = pytree.tree_unflatten(
                list(args), self.program.call_spec.in_spec
            )
            return self.module(*call_args, **call_kwargs)
        return self.module(*args)

    def run(self, inputs: Arrays) -> Arrays:
        """The original model's outputs on ``inputs``, named like the ONNX outputs."""
        torch = _torch()
        args = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names)
        with torch.no_grad():
            values = _flatten(self._call(args))
        return {
            name: _to_numpy(value) for name, value in zip(self.output_names, values, strict=True)
        }
