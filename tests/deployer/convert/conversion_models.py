"""Real models in every upload format, made in code for the conversion tests (no downloads).

Each builder writes the file the user's training code would write and returns what
the test needs to compute answers. torch is imported lazily: the sklearn and ONNX
builders work without the torch extra.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.onnx_models import linear_model

# A PyTorch model with two inputs and two outputs (scores and a label per row).
FEATURES, EXTRA, CLASSES = 6, 3, 4


def torch_module() -> Any:
    from tests.deployer.convert.torch_models import TwoHeads

    torch = _torch()
    torch.manual_seed(0)
    return TwoHeads(FEATURES, EXTRA, CLASSES).eval()


def _torch() -> Any:
    import torch

    return torch


def torch_sample(rows: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((rows, FEATURES)).astype(np.float32),
        "extra": rng.standard_normal((rows, EXTRA)).astype(np.float32),
    }


def torchscript_file(path: Path) -> Any:
    """``torch.jit.script(model).save(path)``; returns the eager module for answers."""
    import torch

    module = torch_module()
    torch.jit.script(module).save(str(path))
    return module


def pt2_file(path: Path, *, dynamic: bool = True) -> Any:
    """``torch.export.save(torch.export.export(...), path)`` with a dynamic batch axis."""
    import torch

    module = torch_module()
    sample = torch_sample(rows=3)
    args = (torch.from_numpy(sample["features"]), torch.from_numpy(sample["extra"]))
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        shapes = {"features": {0: batch}, "extra": {0: batch}}
    torch.export.save(torch.export.export(module, args, dynamic_shapes=shapes), str(path))
    return module


def torch_answers(module: Any, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        scores, labels = module(
            torch.from_numpy(inputs["features"]), torch.from_numpy(inputs["extra"])
        )
    return scores.numpy(), labels.numpy()


def noisy_torchscript_file(path: Path) -> None:
    """Converts fine, but adds fresh noise on every run: the check must catch it."""
    from tests.deployer.convert.torch_models import Noisy

    _torch().jit.script(Noisy()).save(str(path))


def unsupported_torchscript_file(path: Path) -> None:
    """A TorchScript module with an operator the ONNX exporter cannot translate."""
    from tests.deployer.convert.torch_models import Spectrum

    _torch().jit.script(Spectrum()).save(str(path))


# ---------------------------------------------------------------- scikit-learn

SK_FEATURES = 5


def sklearn_data(rows: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, SK_FEATURES)).astype(np.float32)
    labels = np.where(x[:, 0] + x[:, 1] > 0, "cat", "dog").astype(object)
    labels[x[:, 2] > 1] = "bird"
    target = (2 * x[:, 0] - x[:, 3] + 0.5).astype(np.float64)
    return x, labels.astype(str), target


def string_label_pipeline() -> Any:
    """StandardScaler + LogisticRegression predicting 'bird', 'cat' or 'dog'."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, labels, _ = sklearn_data()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, labels)


def regressor() -> Any:
    from sklearn.ensemble import RandomForestRegressor

    x, _, target = sklearn_data()
    return RandomForestRegressor(n_estimators=8, max_depth=5, random_state=0).fit(x, target)


def skops_file(path: Path, estimator: Any) -> None:
    import skops.io

    skops.io.dump(estimator, str(path))


def pickle_file(path: Path, estimator: Any) -> None:
    path.write_bytes(pickle.dumps(estimator, protocol=5))


def joblib_file(path: Path, estimator: Any, *, compress: int = 3) -> None:
    import joblib

    joblib.dump(estimator, str(path), compress=compress)


def unsupported_sklearn_pipeline() -> Any:
    """A pipeline with a custom Python function, which skl2onnx cannot translate."""
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, _, target = sklearn_data()
    return make_pipeline(FunctionTransformer(np.expm1), LinearRegression()).fit(x, target)


class _RunsCode:
    """Pickles to a call of numpy's ``runstring``: exec() on load, under an innocent name.

    Not in the obvious denylist (os.system, builtins.exec...), which is the point:
    only the sandbox keeps such a file from touching the host.
    """

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, Any]]]:
        from numpy.testing._private.utils import runstring

        return runstring, (self.code, {})


def marker_pickle(path: Path, marker: Path) -> None:
    """A fitted LinearRegression that, when unpickled, creates ``marker``."""
    from sklearn.linear_model import LinearRegression

    x, _, target = sklearn_data(rows=20)
    estimator = LinearRegression().fit(x, target)
    estimator.payload = _RunsCode(f"open({str(marker)!r}, 'w').write('unpickled here')")
    path.write_bytes(pickle.dumps(estimator))


class _Allocates:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self) -> tuple[Any, tuple[tuple[int, ...]]]:
        return np.ones, (self.shape,)


def greedy_pickle(path: Path, *, gigabytes: int = 16) -> None:
    """An estimator whose unpickling fills ``gigabytes`` of memory."""
    from sklearn.linear_model import LinearRegression

    x, _, target = sklearn_data(rows=20)
    estimator = LinearRegression().fit(x, target)
    side = int((gigabytes * 1024**3 / 8) ** 0.5)
    estimator.payload = _Allocates((side, side))
    path.write_bytes(pickle.dumps(estimator))


class _Sleeps:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[Any, tuple[float]]:
        import time

        return time.sleep, (self.seconds,)


def slow_pickle(path: Path, *, seconds: float = 600) -> None:
    """An estimator whose unpickling sleeps for ``seconds``."""
    from sklearn.linear_model import LinearRegression

    x, _, target = sklearn_data(rows=20)
    estimator = LinearRegression().fit(x, target)
    estimator.payload = _Sleeps(seconds)
    path.write_bytes(pickle.dumps(estimator))


# ---------------------------------------------------------------- ONNX archives


def onnx_with_external_data(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A linear ONNX model whose weights live in ``weights.bin`` beside it."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "model.onnx"
    weight, bias = linear_model(model_path, in_features=64, out_features=32)
    proto = onnx.load(str(model_path))
    onnx.save_model(
        proto,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return model_path, weight, bias


def onnx_zip(path: Path, folder: Path, *, prefix: str = "") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, prefix + file.name)


def onnx_tar_gz(path: Path, folder: Path, *, prefix: str = "model/") -> None:
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(folder.iterdir()):
            archive.add(file, prefix + file.name)


def zip_with_entries(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def tar_with_symlink(path: Path, model: bytes) -> None:
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(model)
        archive.addfile(info, io.BytesIO(model))
        link = tarfile.TarInfo("weights.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
