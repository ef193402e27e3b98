"""Format detection reads content (zip entries, magic bytes, protobuf fields), never loads."""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from deployer.convert.formats import Format, UnsupportedFormat, detect, pickle_globals, resolve
from deployer.errors import InvalidModel
from tests.conftest import require_module
from tests.deployer.convert import conversion_models as cm
from tests.onnx_models import linear_model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    made: dict[str, Path] = {}
    pipeline = cm.string_label_pipeline()
    for name, write in {
        "model.skops": lambda p: cm.skops_file(p, pipeline),
        "model.pkl": lambda p: cm.pickle_file(p, pipeline),
        "plain.joblib": lambda p: cm.joblib_file(p, pipeline, compress=0),
        "zlib.joblib": lambda p: cm.joblib_file(p, pipeline, compress=3),
        "model.onnx": lambda p: linear_model(p),
    }.items():
        write(root / name)
        made[name] = root / name
    folder = cm.onnx_with_external_data(root / "external")[0].parent
    cm.onnx_zip(root / "model.zip", folder)
    cm.onnx_tar_gz(root / "model.tar.gz", folder)
    made["model.zip"], made["model.tar.gz"] = root / "model.zip", root / "model.tar.gz"
    return made


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.skops", Format.SKOPS),
        ("model.pkl", Format.PICKLE),
        ("plain.joblib", Format.JOBLIB),
        ("zlib.joblib", Format.JOBLIB),
        ("model.onnx", Format.ONNX),
        ("model.zip", Format.ONNX_ARCHIVE),
        ("model.tar.gz", Format.ONNX_ARCHIVE),
    ],
)
def test_formats_are_recognised_from_content(
    files: dict[str, Path], tmp_path: Path, name: str, expected: Format
) -> None:
    # A misleading name changes nothing: only the content counts.
    renamed = tmp_path / "upload.bin"
    renamed.write_bytes(files[name].read_bytes())
    assert detect(renamed).format == expected


def test_pytorch_formats_are_recognised(tmp_path: Path) -> None:
    require_module("torch")
    cm.torchscript_file(tmp_path / "a.bin")
    cm.pt2_file(tmp_path / "b.bin")
    assert detect(tmp_path / "a.bin").format == Format.TORCHSCRIPT
    assert detect(tmp_path / "b.bin").format == Format.TORCH_EXPORT


def test_pickled_torch_module_and_state_dict_get_export_advice(tmp_path: Path) -> None:
    require_module("torch")
    import torch

    module = cm.torch_module()
    torch.save(module, tmp_path / "full.pt")
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(UnsupportedFormat, match=r"not supported yet: a pickled torch.nn.Module"):
        detect(tmp_path / "full.pt")
    with pytest.raises(UnsupportedFormat, match=r"only tensors \(a state_dict\).*torch.export"):
        detect(tmp_path / "weights.pt")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "Keras/HDF5"),
    ],
)
def test_other_frameworks_are_named_with_what_to_do(
    tmp_path: Path, content: bytes, phrase: str
) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormat, match=rf"not supported: .*{phrase}.*model\.keras"):
        detect(path)


def test_keras_zip_and_savedmodel_archive_are_recognised(tmp_path: Path) -> None:
    cm.zip_with_entries(
        tmp_path / "m.bin",
        {"config.json": b"{}", "metadata.json": b"{}", "model.weights.h5": b"\x89HDF"},
    )
    cm.zip_with_entries(tmp_path / "saved.zip", {"export/saved_model.pb": b"\x08\x01"})
    assert detect(tmp_path / "m.bin").format == Format.KERAS
    assert detect(tmp_path / "saved.zip").format == Format.TF_SAVED_MODEL


def test_npz_is_pointed_to_the_sample_field(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", input=np.ones((2, 3)))
    with pytest.raises(UnsupportedFormat, match="sample input"):
        detect(tmp_path / "x.npz")


def test_pickled_xgboost_and_foreign_objects_are_refused_without_loading(tmp_path: Path) -> None:
    # A pickle naming xgboost's class: detection reads the opcodes only, so xgboost
    # need not be installed and nothing is executed.
    data = (
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x0fxgboost.sklearn\x94"
        b"\x8c\rXGBClassifier\x94\x93\x94)\x81\x94."
    )
    (tmp_path / "x.pkl").write_bytes(data)
    with pytest.raises(UnsupportedFormat, match=r"pickled xgboost.*save_model\('model.json'\)"):
        detect(tmp_path / "x.pkl")
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(UnsupportedFormat, match="not a scikit-learn estimator"):
        detect(tmp_path / "d.pkl")


def test_pickle_calling_os_system_is_refused_at_detection(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return os.system, ("true",)

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InvalidModel, match=r"calls posix.system") as error:
        detect(tmp_path / "evil.pkl")
    assert error.value.code == "dangerous_pickle"


def test_pickle_globals_are_read_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cm.marker_pickle(tmp_path / "m.pkl", marker)
    names = pickle_globals((tmp_path / "m.pkl").read_bytes())
    assert names[0] == "sklearn.linear_model._base.LinearRegression"
    assert "numpy.testing._private.utils.runstring" in names
    assert not marker.exists()


def test_stated_format_that_contradicts_the_content_fails(files: dict[str, Path]) -> None:
    with pytest.raises(
        InvalidModel, match=r"uploaded as scikit-learn via skops.*content is"
    ) as err:
        resolve(files["model.pkl"], stated="skops")
    assert err.value.code == "format_mismatch"
    # Same family: a joblib file stated as pickle is fine.
    assert resolve(files["plain.joblib"], stated="pickle").format == Format.JOBLIB


def test_unrecognised_content_falls_back_to_the_stated_format_or_extension(tmp_path: Path) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"this is a text file, not a model\n" * 4)
    assert resolve(garbage).format == Format.ONNX
    assert resolve(garbage, stated="onnx").format == Format.ONNX
    other = tmp_path / "model.bin"
    other.write_bytes(b"this is a text file, not a model\n" * 4)
    with pytest.raises(InvalidModel, match="does not recognise this file") as error:
        resolve(other)
    assert error.value.code == "unknown_format"


def test_empty_files_are_named_at_detection(tmp_path: Path) -> None:
    empty = tmp_path / "model.pkl"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModel, match="empty") as error:
        resolve(empty)
    assert error.value.code == "empty_file"


def test_truncated_zip_is_not_guessed_as_anything(files: dict[str, Path], tmp_path: Path) -> None:
    data = files["model.skops"].read_bytes()
    cut = tmp_path / "cut.skops"
    cut.write_bytes(data[: len(data) // 2])
    found = detect(cut)
    assert found.format is None
    assert "cannot be read" in found.evidence
    # ... so the extension decides, and the loader names the problem.
    assert resolve(cut).format == Format.SKOPS


def test_zip_listing_does_not_extract(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.onnx", b"\0" * (64 * 1024 * 1024))
    assert detect(bomb).format == Format.ONNX_ARCHIVE
