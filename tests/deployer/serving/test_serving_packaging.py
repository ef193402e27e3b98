"""The runtime stays self-contained: allowed imports only, warm-up options, exit codes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving_onnx_models import mlp, reshaping

REPO = Path(__file__).resolve().parents[3]
SERVING = REPO / "deployer" / "serving"
ALLOWED = {
    "numpy",
    "onnxruntime",
    "httptools",
    "uvloop",
    "grpc",
    "grpc_tools",  # only to compile the .proto when the generated module is missing
    "google",  # protobuf
    "prometheus_client",
    "hyperframe",
    "deployer",
}


def test_serving_imports_only_the_allowed_packages() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in SERVING.rglob("*.py"):
        if path.name.endswith("_pb2.py"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in stdlib or root in ALLOWED, f"{path.name} imports {root}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("deployer")
            ):
                # Inside deployer, only the package root (for __version__) and serving itself.
                assert node.module == "deployer" or node.module.startswith("deployer.serving"), (
                    f"{path.name} imports {node.module}"
                )


def test_importing_the_runtime_pulls_in_no_heavy_framework() -> None:
    code = (
        "import sys\n"
        "import deployer.serving.server, deployer.serving.grpc_server\n"
        "import deployer.serving.metrics, deployer.serving.__main__\n"
        "heavy = ('django', 'mlflow', 'torch', 'requests', 'pandas')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_warm_up_failure_exits_with_a_clear_error(start_server, tmp_path: Path) -> None:
    server = start_server(reshaping(tmp_path / "r.onnx"), "r", ready=False)
    assert server.proc.wait(timeout=60) == 3
    failed = [e for e in server.events() if e.get("event") == "warmup_failed"]
    assert failed
    assert "--warmup-request" in failed[0]["msg"]


def test_warm_up_request_file(start_server, tmp_path: Path) -> None:
    request = tmp_path / "warmup.json"
    request.write_text(
        json.dumps(
            {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 8}]}
        )
    )
    server = start_server(reshaping(tmp_path / "r.onnx"), "r", "--warmup-request", str(request))
    status, answer = server.json(
        "POST",
        "/v2/models/r/infer",
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": list(range(8))}]},
    )
    assert status == 200
    assert answer["outputs"][0]["shape"] == [2, 4]
    # Rows of the warm-up request ([1, 4] each) are independent, so batching stays on; a
    # merged batch whose outputs do not have one row per request row is run request by
    # request, so concurrent [1, 8] requests still get their own [2, 4] each.
    assert server.json("GET", "/v2/models/r/config")[1]["max_batch_size"] == 32
    body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1.0] * 8}]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: server.json("POST", "/v2/models/r/infer", body), range(32))
        )
    assert all(s == 200 and a["outputs"][0]["shape"] == [2, 4] for s, a in answers)


def test_all_model_stats_route_and_bad_flags(start_server, tmp_path: Path) -> None:
    path = mlp(tmp_path / "m.onnx")[0]
    server = start_server(path, "m")
    status, stats = server.json("GET", "/v2/models/stats")
    assert status == 200
    assert stats["model_stats"][0]["name"] == "m"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployer.serving",
            "--model",
            str(path),
            "--model-name",
            "m",
            "--device",
            "tpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 64
    assert "device" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "deployer.serving", "--model", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert missing.returncode == 64
    assert "model_name" in missing.stderr
