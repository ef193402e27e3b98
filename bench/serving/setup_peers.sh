#!/usr/bin/env bash
# Install what the serving benchmark needs beyond the project venv:
# load generators from Debian, and MLServer in its own venv (bench/.venv-peers, gitignored)
# so it does not touch the project's dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq wrk nghttp2-client
fi
if [ ! -x bench/.venv-peers/bin/mlserver ]; then
    python3 -m venv bench/.venv-peers
    # uvloop 0.22+ breaks MLServer 1.7.1's worker processes (no current event loop).
    bench/.venv-peers/bin/pip install -q "mlserver==1.7.1" onnxruntime numpy "uvloop<0.22"
fi
echo "peers ready"
