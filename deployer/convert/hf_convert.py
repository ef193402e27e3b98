"""A Hugging Face transformers model folder (config.json and weights, archived) to ONNX.

The model class is the one ``config.json`` names (``architectures``), taken from the
transformers package itself: ``trust_remote_code`` stays off, so no code from the
upload runs, and nothing is downloaded (``local_files_only``, offline). The export
takes token ids and an attention mask ([batch, sequence], int64) and gives the
model's first output (``logits`` or ``last_hidden_state``). The tokenizer is the
caller's job: files for it in the archive are ignored. transformers exists only in
the ``transformers`` converter image, so this module runs only there.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from deployer.convert.archive import extract_archive
from deployer.convert.formats import Format
from deployer.convert.torch_convert import _first_line, _torch
from deployer.errors import InvalidModel, InvalidSample
from deployer.samples import Arrays

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
INPUTS = ("input_ids", "attention_mask")
# The example the exporter traces: any batch and sequence length work afterwards.
_EXAMPLE_SHAPE = (2, 8)


class TransformersConverter:
    """Loads the folder's model with transformers, exports it, runs the original."""

    input_names = list(INPUTS)

    def __init__(self, path: Path, fmt: Format) -> None:
        self.format = fmt
        torch = _torch()
        torch.set_num_threads(1)
        import transformers

        folder = Path(tempfile.mkdtemp(prefix="hf-"))
        files, _total = extract_archive(path, folder / "upload")
        configs = [PurePosixPath(f) for f in files if PurePosixPath(f).name == "config.json"]
        if not configs:
            raise InvalidModel(
                "The archive has no config.json; archive the folder save_pretrained wrote.",
                code="bad_archive",
            )
        root = folder / "upload" / min(configs, key=lambda p: len(p.parts)).parent
        config = json.loads((root / "config.json").read_text())
        architectures = config.get("architectures") or []
        name = str(architectures[0]) if architectures else "AutoModel"
        cls = getattr(transformers, name, None)
        if cls is None:
            raise InvalidModel(
                f"config.json names the architecture {name!r}, which transformers "
                f"{transformers.__version__} does not define; models that need their own code "
                "(trust_remote_code) are not loaded.",
                code="unsupported_operator",
            )
        try:
            # Eager attention: the SDPA path's mask handling does not survive tracing.
            self.model = cls.from_pretrained(
                str(root),
                local_files_only=True,
                trust_remote_code=False,
                attn_implementation="eager",
            )
        except Exception as exc:  # missing weights, a damaged file, a config mismatch
            raise InvalidModel(
                f"transformers could not load {name}: {_first_line(exc)}. Archive the folder "
                "model.save_pretrained(folder) wrote (config.json and the weights).",
                code="load_failed",
            ) from exc
        self.model.eval()
        self.architecture = name
        self.vocab = int(getattr(self.model.config, "vocab_size", 2) or 2)
        self.output_names: list[str] = []

    converter = "torch.onnx.export (TorchScript exporter, dynamo=False) of the transformers model"

    @property
    def max_opset(self) -> int:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)

    def versions(self) -> dict[str, str]:
        import transformers

        torch = _torch()
        return {"transformers": str(transformers.__version__), "torch": str(torch.__version__)}

    def _example(self, sample: Arrays | None) -> tuple[Any, ...]:
        torch = _torch()
        if sample is not None:
            missing = [n for n in INPUTS if n not in sample]
            if missing:
                raise InvalidSample(
                    f"The sample has no {', '.join(missing)}; a transformers model takes "
                    "input_ids and attention_mask (int64, [batch, sequence]): tokenize a few "
                    "texts with the model's tokenizer and save them as an .npz."
                )
            return tuple(torch.from_numpy(np.asarray(sample[n], dtype=np.int64)) for n in INPUTS)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab, _EXAMPLE_SHAPE, generator=generator)
        return ids, torch.ones(_EXAMPLE_SHAPE, dtype=torch.int64)

    def _call(self, ids: Any, mask: Any) -> Any:
        outputs = self.model(input_ids=ids, attention_mask=mask, return_dict=True)
        name, value = next(iter(outputs.items()))
        return name, value

    def export(
        self, target: Path, *, opset: int, dynamic_batch: bool, sample: Arrays | None
    ) -> list[str]:
        torch = _torch()
        example = self._example(sample)
        with torch.no_grad():
            name, _value = self._call(*example)
        self.output_names = [name]

        class _First(torch.nn.Module):  # type: ignore[misc, name-defined]  # torch is Any here
            """The model as a submodule (so its weights stay parameters), first output only."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                outputs = self.inner(
                    input_ids=input_ids, attention_mask=attention_mask, return_dict=True
                )
                return outputs[name]

        tokens = {0: "batch", 1: "sequence"}
        axes = {"input_ids": tokens, "attention_mask": tokens}
        axes[name] = tokens if _value.ndim == 3 else {0: "batch"}
        try:
            with torch.no_grad():
                # The wrapper in eval mode too: the exporter restores its mode afterwards,
                # to the model inside as well, and training mode would turn dropout on.
                torch.onnx.export(
                    _First(self.model).eval(),
                    example,
                    str(target),
                    dynamo=False,
                    input_names=list(INPUTS),
                    output_names=[name],
                    dynamic_axes=axes,
                    opset_version=opset,
                )
        except Exception as exc:
            raise InvalidModel(
                f"torch.onnx.export could not convert {self.architecture} at opset {opset}: "
                f"{_first_line(exc)}.",
                code="unsupported_operator",
            ) from exc
        self.model.eval()
        return [
            f"{self.architecture}: inputs input_ids and attention_mask, output {name}; "
            "tokenizing is the caller's job"
        ]

    def run(self, inputs: Arrays) -> Arrays:
        torch = _torch()
        ids, mask = (torch.from_numpy(np.asarray(inputs[n], dtype=np.int64)) for n in INPUTS)
        with torch.no_grad():
            name, value = self._call(ids, mask)
        return {name: value.detach().numpy()}
