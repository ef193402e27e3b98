"""A PyTorch state_dict archive as users upload it: weights, the module's source, a manifest."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# The module's source as a user would write it: a constructor argument and two layers.
SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, features: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x), dim=-1)
"""
KWARGS = {"features": 5, "hidden": 12}


def build_module(kwargs: dict[str, Any] | None = None) -> Any:
    """``Net(**kwargs)`` from ``SOURCE``, with seeded random weights."""
    import torch

    folder = Path(__file__).parent
    spec = importlib.util.spec_from_loader("state_dict_net", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(SOURCE, str(folder / "net.py"), "exec"), module.__dict__)  # noqa: S102
    sys.modules.setdefault("state_dict_net", module)
    torch.manual_seed(0)
    return module.Net(**(kwargs or KWARGS)).eval()


def weights_bytes(net: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


def state_dict_zip(
    path: Path, *, manifest: dict[str, Any] | None = None, kwargs: dict[str, Any] | None = None
) -> Any:
    """Write the archive; return the module (built with ``kwargs``) whose weights it holds."""
    net = build_module(kwargs)
    chosen = manifest or {"module": "net.py", "class": "Net", "kwargs": KWARGS}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("net.py", SOURCE)
        archive.writestr("weights.pth", weights_bytes(net))
        archive.writestr("modelport.json", json.dumps(chosen))
    return net


def state_dict_tar_gz(path: Path) -> Any:
    """The same in a .tar.gz with one top folder, the inputs declared in the manifest."""
    net = build_module()
    manifest = {
        "module": "net.py",
        "class": "Net",
        "kwargs": KWARGS,
        "inputs": [{"name": "x", "shape": [2, KWARGS["features"]], "dtype": "float32"}],
    }
    entries = {
        "model/net.py": SOURCE.encode(),
        "model/weights.pth": weights_bytes(net),
        "model/modelport.json": json.dumps(manifest).encode(),
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return net


def sample(rows: int = 6) -> np.ndarray:
    return np.random.default_rng(2).normal(size=(rows, KWARGS["features"])).astype(np.float32)
