"""deployer/ is the engine and never imports Django (nor the serving runtime MLflow or torch)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import deployer


def _modules() -> list[str]:
    names = ["deployer"]
    for info in pkgutil.walk_packages(deployer.__path__, "deployer."):
        if info.name.endswith("__main__") or ".proto." in info.name:
            continue
        names.append(info.name)
    return names


def test_deployer_never_imports_django() -> None:
    modules = _modules()
    assert len(modules) > 10
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"deployer imported Django modules: {result.stdout}"


def test_portal_is_what_imports_django() -> None:
    """The check above can fail: importing the portal does pull Django in."""
    code = (
        "import os, sys\n"
        "os.environ['DJANGO_SETTINGS_MODULE']='portal.settings_test'\n"
        "import django; django.setup()\n"
        "import portal.registry.services\n"
        "print('django' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip().endswith("True")


def test_a_plain_install_can_compile_the_grpc_module() -> None:
    """The generated gRPC module is not in git: a local serving process compiles it on
    first start. So grpcio-tools must come with a plain install (``make run`` installs
    no extras), not only with the dev extra."""
    import re
    import tomllib

    from tests.conftest import REPO

    tracked = subprocess.run(
        ["git", "ls-files", "deployer/serving/proto"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert "grpc_predict_v2.proto" in tracked
    assert "_pb2" not in tracked
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    plain = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert "grpcio-tools" in plain


# The conversion steps that only ``deployer.convert.pipeline.convert`` may sequence.
_CONVERSION_STEPS = {
    "deployer.convert.formats": {"detect", "resolve"},
    "deployer.convert.archive": {"extract_onnx_archive", "extract_archive", "extract_flat_folder"},
    "deployer.validate": {"validate_onnx"},
    "deployer.convert.job": None,  # any name: the conversion job itself
    "deployer.convert.parity": None,
    "deployer.convert.onnx_tools": None,
    "deployer.convert.runner": {"convert_model", "choose_sandbox"},
}


def _step_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in _CONVERSION_STEPS:
            steps = _CONVERSION_STEPS[node.module]
            found += [
                f"{node.module}.{alias.name}"
                for alias in node.names
                if steps is None or alias.name in steps
            ]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in _CONVERSION_STEPS]
    return found


def test_the_portal_converts_with_one_engine_call_and_never_sequences_the_steps() -> None:
    """Issue 12, point 9: an upload goes down the layers once. The portal may name the
    pipeline's request, events and result types, but not the steps it sequences."""
    portal = Path(deployer.__file__).resolve().parents[1] / "portal"
    offenders: dict[str, list[str]] = {}
    calls = 0
    for path in sorted(portal.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if found := _step_imports(tree):
            offenders[str(path.relative_to(portal.parent))] = found
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "convert"
            ):
                calls += 1
    assert offenders == {}, offenders
    assert calls == 1, f"the portal calls the pipeline's convert() {calls} times"
    # The check can fail: a file that imports a step is found.
    assert _step_imports(ast.parse("from deployer.convert.formats import detect")) == [
        "deployer.convert.formats.detect"
    ]
