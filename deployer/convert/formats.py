"""Tell an upload's format from its content: zip entries, magic bytes, a protobuf walk.

Nothing here loads a model. Pickles are read with :mod:`pickletools`, which lists
opcodes without executing them; zip and tar archives are listed, never extracted;
an ONNX file is recognised by walking the top-level fields of its protobuf
encoding without decoding them. This runs in the worker that drives jobs, so it
must stay this way: loading happens only in the sandbox.
"""

from __future__ import annotations

import bz2
import enum
import gzip
import io
import lzma
import os
import pickletools
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from deployer.errors import DeployerError, InvalidModel

# How much of a file or archive entry detection reads at most.
_SCAN_BYTES = 8 * 1024 * 1024
# Members a tar listing may walk before detection gives up on it.
_TAR_LIST_MEMBERS = 10_000


class Format(enum.StrEnum):
    """The formats ModelPort accepts (values are the portal's ``SourceFormat`` values)."""

    ONNX = "onnx"
    ONNX_ARCHIVE = "onnx_archive"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch_export"
    TORCH_STATE_DICT = "torch_state_dict"
    SKOPS = "skops"
    PICKLE = "pickle"
    JOBLIB = "joblib"
    XGBOOST = "xgboost"
    LIGHTGBM = "lightgbm"
    CATBOOST = "catboost"
    KERAS = "keras"
    TF_SAVED_MODEL = "tf_saved_model"
    TRANSFORMERS = "transformers"


LABELS: dict[Format, str] = {
    Format.ONNX: "ONNX",
    Format.ONNX_ARCHIVE: "ONNX archive (.zip/.tar.gz with external data)",
    Format.TORCHSCRIPT: "PyTorch TorchScript (torch.jit.save)",
    Format.TORCH_EXPORT: "PyTorch torch.export program (.pt2)",
    Format.TORCH_STATE_DICT: "PyTorch state_dict with its module's source (.zip/.tar.gz)",
    Format.SKOPS: "scikit-learn via skops (.skops)",
    Format.PICKLE: "scikit-learn pickle (.pkl)",
    Format.JOBLIB: "scikit-learn joblib (.joblib)",
    Format.XGBOOST: "XGBoost model (save_model: .json or .ubj)",
    Format.LIGHTGBM: "LightGBM text model (save_model: .txt)",
    Format.CATBOOST: "CatBoost model (save_model: .cbm)",
    Format.KERAS: "Keras 3 model (.keras)",
    Format.TF_SAVED_MODEL: "TensorFlow SavedModel folder (.zip/.tar.gz)",
    Format.TRANSFORMERS: "Hugging Face transformers model folder (.zip/.tar.gz)",
}

# What an upload of each format needs besides the file, for the upload page and README.
NEEDS: dict[Format, str] = {
    Format.ONNX: "the .onnx file",
    Format.ONNX_ARCHIVE: "one archive: the .onnx file and its external data files",
    Format.TORCHSCRIPT: "the file from torch.jit.save, and a sample input (it records no shapes)",
    Format.TORCH_EXPORT: "the .pt2 file from torch.export.save",
    Format.TORCH_STATE_DICT: (
        "one archive: the weights (torch.save(model.state_dict())), the module's source (.py) "
        'and modelport.json {"module": "net.py", "class": "Net", "kwargs": {...}}; a sample '
        'input or "inputs" in modelport.json'
    ),
    Format.SKOPS: "the .skops file (a sample input when the estimator records no feature count)",
    Format.PICKLE: "the pickle of a scikit-learn estimator or pipeline",
    Format.JOBLIB: "the joblib file of a scikit-learn estimator or pipeline",
    Format.XGBOOST: "the file from save_model (.json or .ubj)",
    Format.LIGHTGBM: "the text file from booster.save_model",
    Format.CATBOOST: "the .cbm file from save_model (numeric features only)",
    Format.KERAS: "the .keras file from model.save (Keras 3)",
    Format.TF_SAVED_MODEL: (
        "one archive of the folder tf.saved_model.save wrote, with a serving_default signature"
    ),
    Format.TRANSFORMERS: (
        "one archive of the folder save_pretrained wrote (config.json and the weights); the "
        "model takes input_ids and attention_mask, so tokenizing stays the caller's job; a "
        "sample of token ids (.npz) is optional"
    ),
}

# Loading these runs code from the file: only in a container, or where an operator
# trusts the uploaders (trusted local conversion).
CODE_EXECUTING = frozenset(
    {Format.TORCHSCRIPT, Format.TORCH_EXPORT, Format.TORCH_STATE_DICT, Format.PICKLE, Format.JOBLIB}
)
TORCH_FORMATS = frozenset({Format.TORCHSCRIPT, Format.TORCH_EXPORT, Format.TORCH_STATE_DICT})
SKLEARN_FORMATS = frozenset({Format.SKOPS, Format.PICKLE, Format.JOBLIB})
TREE_FORMATS = frozenset({Format.XGBOOST, Format.LIGHTGBM, Format.CATBOOST})
TENSORFLOW_FORMATS = frozenset({Format.KERAS, Format.TF_SAVED_MODEL})
# One input table [rows, features], whatever the sample calls it.
TABLE_FORMATS = SKLEARN_FORMATS | TREE_FORMATS
ONNX_FORMATS = frozenset({Format.ONNX, Format.ONNX_ARCHIVE})
# Formats that need a converter; ONNX and ONNX archives are served as they are.
CONVERTED_FORMATS = (
    TORCH_FORMATS | SKLEARN_FORMATS | TREE_FORMATS | TENSORFLOW_FORMATS | {Format.TRANSFORMERS}
)
# Converted in a container or not at all, trusted local conversion or not: the trees'
# frameworks exist only in their converter image (never next to the portal), and a
# state_dict upload is the uploader's Python source, run only where it cannot reach anything.
CONTAINER_ONLY = TREE_FORMATS | TENSORFLOW_FORMATS | {Format.TORCH_STATE_DICT, Format.TRANSFORMERS}
# The converter image (``deployer.convert.image.FAMILIES``) each converted format needs.
_FAMILIES: dict[Format, str] = {
    **dict.fromkeys(TREE_FORMATS, "trees"),
    **dict.fromkeys(TENSORFLOW_FORMATS, "tensorflow"),
    Format.TRANSFORMERS: "transformers",
}


def family_of(fmt: Format) -> str:
    """The converter family (image) that converts ``fmt``."""
    return _FAMILIES.get(fmt, "core")


# Stated formats that name the same thing as a detected one.
_SAME_FAMILY = [ONNX_FORMATS, frozenset({Format.PICKLE, Format.JOBLIB})]

_EXTENSIONS: dict[str, Format] = {
    ".onnx": Format.ONNX,
    ".zip": Format.ONNX_ARCHIVE,
    ".tgz": Format.ONNX_ARCHIVE,
    ".tar.gz": Format.ONNX_ARCHIVE,
    ".pt2": Format.TORCH_EXPORT,
    # Also what torch.save writes, but a torch.save file is recognised by its content.
    ".pt": Format.TORCHSCRIPT,
    ".ts": Format.TORCHSCRIPT,
    ".skops": Format.SKOPS,
    ".pkl": Format.PICKLE,
    ".pickle": Format.PICKLE,
    ".joblib": Format.JOBLIB,
    ".ubj": Format.XGBOOST,
    ".cbm": Format.CATBOOST,
    ".keras": Format.KERAS,
}

_TORCH_EXPORT_HINT = (
    "export it with torch.export (torch.export.save(torch.export.export(model, example_inputs), "
    "'model.pt2')) or as TorchScript (torch.jit.script(model).save('model.pt')) and upload that"
)
# What names a state_dict archive's module (``deployer.convert.state_dict_convert``).
STATE_DICT_MANIFEST = "modelport.json"
_STATE_DICT_HINT = (
    "upload the weights in a .zip or .tar.gz with the module's source file (.py) and "
    'modelport.json naming the class: {"module": "net.py", "class": "Net", "kwargs": {}}'
)
_TF2ONNX_HINT = "export it as ONNX with tf2onnx (python -m tf2onnx.convert) and upload the .onnx"


def safe_alternative(fmt: Format) -> str:
    """What to upload instead of ``fmt`` where files that run code are refused."""
    if fmt in TENSORFLOW_FORMATS:
        return _TF2ONNX_HINT
    if fmt == Format.TRANSFORMERS:
        return (
            "export the model to ONNX yourself (torch.onnx.export of the model with input_ids "
            "and attention_mask) and upload the .onnx"
        )
    if fmt in TREE_FORMATS:
        return (
            "export the model to ONNX yourself (onnxmltools for XGBoost and LightGBM, "
            "save_model(..., format='onnx') for CatBoost) and upload the .onnx"
        )
    if fmt in TORCH_FORMATS:
        return (
            "export the model to ONNX (torch.onnx.export(model, example_inputs, 'model.onnx')) "
            "and upload the .onnx"
        )
    return "upload the model as ONNX or as a skops file (skops.io.dump)"


def torch_install_command() -> str:
    """The command that adds PyTorch next to this installation's interpreter.

    A source checkout (the usual install, ``pip install -e .``) gets its own ``torch``
    extra; any other install gets the extra's pins directly. ``modelport`` is not on PyPI.
    """
    root = Path(__file__).resolve().parents[2]
    python = sys.executable or "python3"
    if (root / "pyproject.toml").is_file() and "torch = [" in (root / "pyproject.toml").read_text():
        return f"{python} -m pip install -e '{root}[torch]'"
    return f"{python} -m pip install torch==2.13.0 'onnxscript>=0.5'"


class UnsupportedFormat(DeployerError):
    """A recognised format that ModelPort does not convert (yet)."""

    code = "unsupported_format"


@dataclass(frozen=True)
class Detection:
    """What the content says the file is, and the evidence for it."""

    format: Format | None
    evidence: str
    # "zip", "tar.gz", "pickle protocol 4", "protobuf"...: how it was recognised.
    container: str = ""


def detect(path: Path) -> Detection:
    """Recognise the file's format from its content; ``format`` is None when nothing fits.

    Raises ``UnsupportedFormat`` for a recognised format ModelPort does not convert.
    """
    size = path.stat().st_size
    if size == 0:
        return Detection(None, "the file is empty")
    with path.open("rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _detect_zip(path)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise UnsupportedFormat(
            "not supported: a legacy Keras/HDF5 model (.h5). Load it and save it as Keras 3 "
            f"(model.save('model.keras')) and upload that, or {_TF2ONNX_HINT}."
        )
    if len(head) > 262 and head[257:262] == b"ustar":
        return _detect_tar(path, "r:")
    if head.startswith(b"\x1f\x8b"):
        return _detect_gzip(path)
    compressed = _decompressor(head)
    if compressed is not None:
        kind, opener = compressed
        prefix = _read_decompressed(path, opener)
        found = _detect_pickle(prefix, f"{kind}-compressed pickle")
        if found is not None:
            # joblib.dump(..., compress=...) writes exactly this.
            return Detection(Format.JOBLIB, found.evidence, found.container)
        return Detection(None, f"a {kind}-compressed file that holds no pickle")
    pickled = _detect_pickle(_read(path), "pickle")
    if pickled is not None:
        return pickled
    trees = _detect_tree_model(head)
    if trees is not None:
        return trees
    return _detect_protobuf(path, size)


def resolve(path: Path, *, stated: str = "", file_name: str = "") -> Detection:
    """The format to process the file as: the content's, checked against a stated one.

    A stated format that contradicts what the content clearly is fails with a
    message naming both. When the content is not recognised, the stated format or
    else the file name's extension decides, and the format's own loader then names
    the problem; with neither, the upload fails here.
    """
    found = detect(path)
    claimed = _stated(stated)
    if found.format is not None:
        if claimed is not None and not _same_family(claimed, found.format):
            raise InvalidModel(
                f"The file was uploaded as {LABELS[claimed]}, but its content is "
                f"{LABELS[found.format]} ({found.evidence}). Upload it again with the format "
                f"{found.format.value!r}, or leave the format empty to have it detected.",
                code="format_mismatch",
            )
        return found
    fallback = claimed or _by_extension(file_name or path.name)
    # An empty .onnx goes on to validation, which says the same in ONNX's words.
    if path.stat().st_size == 0 and fallback not in ONNX_FORMATS:
        raise InvalidModel(
            "The uploaded file is empty (0 bytes). Upload the model file your training code wrote.",
            code="empty_file",
        )
    if fallback is not None:
        how = "as stated" if claimed is not None else "by its file name"
        return Detection(fallback, f"{found.evidence}; taken {how}")
    supported = ", ".join(LABELS[f] for f in Format)
    raise InvalidModel(
        f"ModelPort does not recognise this file ({found.evidence}). It accepts {supported}. "
        "If the file was cut short, upload it again; otherwise state its format.",
        code="unknown_format",
    )


def _stated(stated: str) -> Format | None:
    if not stated:
        return None
    try:
        return Format(stated)
    except ValueError:
        choices = ", ".join(f.value for f in Format)
        raise InvalidModel(
            f"Unknown format {stated!r}; choose one of {choices} or leave it empty.",
            code="unknown_format",
        ) from None


def _same_family(a: Format, b: Format) -> bool:
    return a == b or any(a in family and b in family for family in _SAME_FAMILY)


def _by_extension(file_name: str) -> Format | None:
    lowered = file_name.lower()
    for suffix, fmt in sorted(_EXTENSIONS.items(), key=lambda item: -len(item[0])):
        if lowered.endswith(suffix):
            return fmt
    return None


def _read(path: Path, limit: int = _SCAN_BYTES) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit)


# ---------------------------------------------------------------- zip


def _detect_zip(path: Path) -> Detection:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            return _classify_zip(archive, names)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return Detection(None, f"it starts like a zip archive but cannot be read as one ({exc})")


def _state_dict_archive(names: list[str], kind: str) -> Detection | None:
    """An archive with modelport.json and a Python source: a state_dict with its module."""
    base = {os.path.basename(n) for n in names}
    if STATE_DICT_MANIFEST in base and any(n.endswith(".py") for n in base):
        return Detection(
            Format.TORCH_STATE_DICT,
            f"{kind} with {STATE_DICT_MANIFEST} and a module's source",
            container=kind,
        )
    return None


def _transformers_archive(names: list[str], kind: str) -> Detection | None:
    """An archive of a save_pretrained folder: config.json beside safetensors or .bin weights."""
    base = {os.path.basename(n) for n in names}
    weights = any(n.endswith(".safetensors") for n in base) or "pytorch_model.bin" in base
    if "config.json" in base and weights and "metadata.json" not in base:
        return Detection(
            Format.TRANSFORMERS, f"{kind} with config.json and transformers weights", kind
        )
    return None


def _classify_zip(archive: zipfile.ZipFile, names: list[str]) -> Detection:
    found = _state_dict_archive(names, "zip") or _transformers_archive(names, "zip")
    if found is not None:
        return found
    # torch writes every entry under one top folder named after the file.
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
        return Detection(Format.TORCHSCRIPT, "zip with code/ and constants.pkl", "zip")
    if "models/model.json" in tails or any(
        t.startswith("serialized_exported_program") for t in tails
    ):
        return Detection(Format.TORCH_EXPORT, "zip with a serialized exported program", "zip")
    if "data.pkl" in tails:
        _raise_torch_save(archive, next(n for n in names if n.endswith("data.pkl")))
    if "schema.json" in names:
        return Detection(Format.SKOPS, "zip with a skops schema.json", "zip")
    if "saved_model.pb" in {os.path.basename(n) for n in names}:
        return Detection(Format.TF_SAVED_MODEL, "zip with a SavedModel (saved_model.pb)", "zip")
    if {"config.json", "metadata.json"} <= set(names) and any(n.endswith(".h5") for n in names):
        return Detection(Format.KERAS, "zip with Keras's config.json and metadata.json", "zip")
    onnx_entries = [n for n in names if n.lower().endswith(".onnx")]
    if onnx_entries:
        return Detection(
            Format.ONNX_ARCHIVE, f"zip holding {', '.join(onnx_entries[:3])}", container="zip"
        )
    if names and all(n.endswith(".npy") for n in names):
        raise UnsupportedFormat(
            "This is a NumPy archive (.npz): it holds arrays, not a model. Upload it as the "
            "sample input, and the model file itself as the model."
        )
    return Detection(None, f"a zip archive with no model in it ({', '.join(names[:5])})")


def _raise_torch_save(archive: zipfile.ZipFile, entry: str) -> None:
    with archive.open(entry) as handle:
        data = handle.read(_SCAN_BYTES)
    names = pickle_globals(data)
    if any(n.startswith("torch.nn.") or n.startswith("__main__.") for n in names):
        raise UnsupportedFormat(
            "not supported yet: a pickled torch.nn.Module (torch.save(model)); loading one "
            f"needs your training code. Instead, {_TORCH_EXPORT_HINT}."
        )
    raise UnsupportedFormat(
        "This torch.save file holds only tensors (a state_dict), not the model's code. To "
        f"upload it, {_STATE_DICT_HINT}; or {_TORCH_EXPORT_HINT}."
    )


# ---------------------------------------------------------------- tar and compression


def _detect_gzip(path: Path) -> Detection:
    prefix = _read_decompressed(path, gzip.GzipFile)
    if len(prefix) > 262 and prefix[257:262] == b"ustar":
        return _detect_tar(path, "r:gz")
    found = _detect_pickle(prefix, "gzip-compressed pickle")
    if found is not None:
        return Detection(Format.JOBLIB, found.evidence, found.container)
    return Detection(None, "a gzip-compressed file that holds neither a tar archive nor a pickle")


def _detect_tar(path: Path, mode: str) -> Detection:
    kind = "tar.gz" if mode == "r:gz" else "tar"
    names: list[str] = []
    try:
        with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
            for member in archive:
                names.append(member.name)
                if len(names) >= _TAR_LIST_MEMBERS:
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if not names:
            return Detection(None, f"it starts like a {kind} archive but cannot be read ({exc})")
    found = _state_dict_archive(names, kind) or _transformers_archive(names, kind)
    if found is not None:
        return found
    base_names = {os.path.basename(n) for n in names}
    if "saved_model.pb" in base_names:
        return Detection(Format.TF_SAVED_MODEL, f"{kind} with a SavedModel (saved_model.pb)", kind)
    onnx_entries = [n for n in names if n.lower().endswith(".onnx")]
    if onnx_entries:
        return Detection(
            Format.ONNX_ARCHIVE, f"{kind} holding {', '.join(onnx_entries[:3])}", container=kind
        )
    return Detection(None, f"a {kind} archive with no .onnx file in it")


def _decompressor(head: bytes) -> tuple[str, type[io.BufferedIOBase]] | None:
    if head[:1] == b"\x78" and head[1:2] in (b"\x01", b"\x5e", b"\x9c", b"\xda"):
        return "zlib", _ZlibReader
    if head.startswith(b"BZh"):
        return "bz2", bz2.BZ2File
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz", lzma.LZMAFile
    return None


class _ZlibReader(io.BufferedIOBase):
    """Just enough of a file object over a zlib stream for ``_read_decompressed``."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def read(self, size: int | None = -1, /) -> bytes:
        limit = _SCAN_BYTES if size is None or size < 0 else size
        decompressor = zlib.decompressobj()
        out = bytearray()
        with self._path.open("rb") as handle:
            while len(out) < limit:
                chunk = handle.read(65536)
                if not chunk:
                    break
                out += decompressor.decompress(chunk, limit - len(out))
        return bytes(out[:limit])


def _read_decompressed(path: Path, opener: type[io.BufferedIOBase]) -> bytes:
    """At most ``_SCAN_BYTES`` of the decompressed stream (a bomb stops here too)."""
    try:
        reader = opener(path)  # type: ignore[call-arg]
        try:
            return reader.read(_SCAN_BYTES)
        finally:
            reader.close()
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError):
        return b""


# ---------------------------------------------------------------- pickle


def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` globals a pickle refers to, read without executing it.

    Reading stops at the first byte that is not a pickle opcode, which is where
    joblib writes raw array data, so the classes named before it are still found.
    """
    found: list[str] = []
    recent: list[object] = []
    memo: dict[int, object] = {}
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = opcode.name
            if name == "GLOBAL":
                module_name, _, qualname = str(arg).partition(" ")
                found.append(f"{module_name}.{qualname}")
                recent.append(None)
            elif name == "STACK_GLOBAL":
                last, before = (recent[-1], recent[-2]) if len(recent) >= 2 else (None, None)
                if isinstance(before, str) and isinstance(last, str):
                    found.append(f"{before}.{last}")
                recent.append(None)
            elif "UNICODE" in name or name.endswith("STRING"):
                recent.append(arg.decode("utf-8", "replace") if isinstance(arg, bytes) else arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(str(arg))] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(str(arg))))
            elif name in ("FRAME", "PROTO"):
                continue
            elif name == "STOP":
                break
            else:
                recent.append(None)
            del recent[:-2]
    except (ValueError, EOFError, UnicodeDecodeError):
        pass
    return found


# Callables a pickle can reach that no model's state needs.
_DANGEROUS_GLOBALS = (
    "os.",
    "posix.",
    "nt.",
    "subprocess.",
    "sys.",
    "shutil.",
    "socket.",
    "importlib.",
    "runpy.",
    "pty.",
    "code.",
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "builtins.__import__",
    "builtins.getattr",
    "builtins.open",
    "__builtin__.eval",
    "__builtin__.getattr",
)


def _detect_pickle(data: bytes, kind: str) -> Detection | None:
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        container = f"{kind} protocol {data[1]}"
    elif data[:1] in (b"(", b"c", b"]", b"}"):
        container = f"{kind} protocol 0/1"
    else:
        return None
    names = pickle_globals(data)
    if not names:
        return None if container.endswith("0/1") else Detection(None, f"a {container} of no class")
    modules = {n.split(".", 1)[0] for n in names}
    first = names[0]
    dangerous = [n for n in names if n.startswith(_DANGEROUS_GLOBALS)]
    if dangerous:
        # Not a security boundary (gadgets hide under other names; the sandbox is the
        # boundary), but no model needs these, so say so instead of loading the file.
        raise InvalidModel(
            f"The pickle calls {dangerous[0]} when it is loaded, which no model needs; it was "
            "refused without being loaded. Save the estimator again (skops.io.dump is safest).",
            code="dangerous_pickle",
        )
    if "sklearn" in modules:
        fmt = Format.JOBLIB if "joblib" in modules or "compressed" in kind else Format.PICKLE
        return Detection(fmt, f"a {container} of {first}", container)
    if "torch" in modules:
        if any(n.startswith("torch.nn.") or n.startswith("__main__.") for n in names):
            raise UnsupportedFormat(
                "not supported yet: a pickled torch.nn.Module; loading one needs your training "
                f"code. Instead, {_TORCH_EXPORT_HINT}."
            )
        raise UnsupportedFormat(
            "This pickle holds PyTorch tensors (a state_dict), not a model. To upload it, "
            f"{_STATE_DICT_HINT}; or {_TORCH_EXPORT_HINT}."
        )
    for library, saved in (
        ("xgboost", "booster.save_model('model.json')"),
        ("lightgbm", "booster.save_model('model.txt')"),
        ("catboost", "model.save_model('model.cbm')"),
    ):
        if library in modules:
            raise UnsupportedFormat(
                f"A pickled {library} model is not accepted: unpickling it runs code and ties it "
                f"to one {library} version. Save it with {saved} and upload that file."
            )
    if modules & {"keras", "tensorflow", "tf_keras"}:
        raise UnsupportedFormat(
            f"not supported yet: a pickled Keras/TensorFlow model; {_TF2ONNX_HINT}."
        )
    raise UnsupportedFormat(
        f"This pickle holds {first}, which is not a scikit-learn estimator. Pickles are "
        "accepted only for scikit-learn estimators and pipelines; export other models to ONNX."
    )


def _detect_tree_model(head: bytes) -> Detection | None:
    """XGBoost (JSON or UBJSON), LightGBM (text) and CatBoost (binary) model files."""
    text = head.lstrip()
    if text.startswith((b"tree\nversion=", b"tree\r\nversion=")):
        return Detection(Format.LIGHTGBM, "a LightGBM text model (tree, version=...)", "text")
    if head.startswith(b"CBM1"):
        return Detection(Format.CATBOOST, "a CatBoost model (CBM1 header)", "cbm")
    if head.startswith(b"binf"):
        raise UnsupportedFormat(
            "This is an XGBoost model in the old binary format, which XGBoost 3 no longer "
            "reads. Load it with the XGBoost that wrote it and save it again with "
            "booster.save_model('model.json') or ('model.ubj'), then upload that file."
        )
    if text.startswith(b'{"') and b'"learner"' in head:
        return Detection(Format.XGBOOST, "an XGBoost JSON model (a learner object)", "json")
    # UBJSON: '{', then each key as a length-prefixed string (i/U/I/l/L marker).
    if head.startswith(b"{") and head[1:2] in b"iUIlL" and b"learner" in head[:64]:
        return Detection(Format.XGBOOST, "an XGBoost UBJSON model (a learner object)", "ubj")
    return None


# ---------------------------------------------------------------- protobuf

# ModelProto's top-level fields and their wire types (0 varint, 2 length-delimited).
_MODEL_PROTO_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_GRAPH_FIELD = 7


def _varint(handle: io.BufferedReader) -> int | None:
    shift, value = 0, 0
    while shift < 64:
        byte = handle.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    return None


def _detect_protobuf(path: Path, size: int) -> Detection:
    """Walk ModelProto's top-level fields (tags and lengths only, payloads skipped)."""
    seen: list[int] = []
    truncated = False
    with path.open("rb") as handle:
        while handle.tell() < size and len(seen) < 100_000:
            tag = _varint(handle)
            if tag is None:
                truncated = True
                break
            number, wire = tag >> 3, tag & 7
            if _MODEL_PROTO_FIELDS.get(number) != wire:
                return Detection(None, "content that is no known model format")
            if wire == 0:
                if _varint(handle) is None:
                    truncated = True
                    break
            else:
                length = _varint(handle)
                if length is None or handle.tell() + length > size:
                    truncated = True
                    break
                handle.seek(length, os.SEEK_CUR)
            seen.append(number)
    if not seen:
        return Detection(None, "content that is no known model format")
    if _GRAPH_FIELD not in seen and set(seen) <= {1, 2} and size > 1024:
        head = _read(path, 65536)
        if b"serve" in head or b"tensorflow" in head:
            raise UnsupportedFormat(
                "This is a SavedModel's saved_model.pb alone; its variables/ folder is needed too. "
                "Archive the whole SavedModel folder (.zip or .tar.gz) and upload that."
            )
    evidence = "an ONNX protobuf" + (" (cut short)" if truncated else "")
    return Detection(Format.ONNX, evidence, "protobuf")
