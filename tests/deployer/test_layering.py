"""deployer/ is the engine and never imports Django (nor the serving runtime MLflow or torch)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

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
