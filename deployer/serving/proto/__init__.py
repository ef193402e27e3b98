"""The V2 gRPC protocol: the .proto beside this file, compiled with grpcio-tools.

The generated `grpc_predict_v2_pb2.py` is not kept in git. Build steps run
`python -m deployer.serving.proto` (needs grpcio-tools); at run time `load()` imports the
generated module, compiling it first when it is missing or older than the .proto (into
this folder, or a cache folder when this one is read-only).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
MODULE = "grpc_predict_v2_pb2"


class ProtoUnavailable(RuntimeError):
    """The generated module is missing and grpcio-tools is not there to make it."""


def generate(out_dir: Path | None = None) -> Path:
    """Compile the .proto into `out_dir` (default: this package); returns the _pb2 path."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise ProtoUnavailable(
            f"{MODULE}.py is missing and grpcio-tools is not installed to generate it; "
            "run `python -m deployer.serving.proto` where grpcio-tools is installed"
        ) from exc
    target = out_dir or PROTO.parent
    target.mkdir(parents=True, exist_ok=True)
    # Compile into a private folder, then move the result into place in one step, so two
    # processes starting at once never import a half-written module.
    scratch = Path(tempfile.mkdtemp(prefix=".protoc-", dir=target))
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"--python_out={scratch}",
            str(PROTO),
        ]
        code = protoc.main(args)
        if code != 0:
            raise ProtoUnavailable(f"protoc failed with exit code {code} on {PROTO}")
        built = scratch / f"{MODULE}.py"
        _use_private_pool(built)
        generated = target / f"{MODULE}.py"
        os.replace(built, generated)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return generated


def _use_private_pool(path: Path) -> None:
    """Register the messages in a pool of their own, not protobuf's default one.

    Other V2 clients (tritonclient.grpc) define the same `inference.*` names in the
    default pool; two definitions there cannot coexist in one process, so a program
    that imports both (a test, the portal) would fail at import time.
    """
    text = path.read_text(encoding="utf-8")
    default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    if default not in text:
        raise ProtoUnavailable(f"unexpected protoc output in {path}")
    text = text.replace(
        default, "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("
    )
    path.write_text(text, encoding="utf-8")


def _fresh(path: Path) -> bool:
    """Newer than the .proto, and made by a protoc no newer than the protobuf runtime
    installed now (protobuf refuses gencode newer than its runtime)."""
    if not path.exists() or path.stat().st_mtime < PROTO.stat().st_mtime:
        return False
    from google.protobuf import __version__ as runtime

    marker = "# Protobuf Python Version: "
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(marker):
                return _version(line[len(marker) :]) <= _version(runtime)
    return True


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split(".")[:3] if part.isdigit())


def load() -> ModuleType:
    """The generated protobuf module, compiling it first if needed."""
    local = PROTO.parent / f"{MODULE}.py"
    if not _fresh(local):
        try:
            generate()
        except OSError:
            return _load_from_cache()
        except ProtoUnavailable:
            if not local.exists():
                raise
    return importlib.import_module(f"{__name__}.{MODULE}")


def _load_from_cache() -> ModuleType:
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"modelport-proto-{digest}"
    path = cache / f"{MODULE}.py"
    if not path.exists():
        generate(cache)
    name = f"{__name__}.{MODULE}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ProtoUnavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
