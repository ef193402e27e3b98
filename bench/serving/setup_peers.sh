#!/usr/bin/env bash
# Install what the serving benchmark needs beyond the project venv:
# load generators from Debian, and each peer server in its own venv (bench/.venv-*, gitignored)
# so none touches the project's dependencies.
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
# KServe's model server, BentoML and Triton (nvidia-pytriton ships a tritonserver binary
# with its Python backend): each pins its own web stack, so each gets its own venv.
peer_venv() {  # peer_venv NAME CHECK_FILE PACKAGES...
    local venv="bench/.venv-$1" check="$2"
    shift 2
    if [ ! -x "$venv/$check" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "$@" onnxruntime numpy
    fi
}
peer_venv kserve bin/python "kserve==0.21.*"
peer_venv bentoml bin/bentoml "bentoml==1.4.*"
peer_venv pytriton bin/python "nvidia-pytriton==0.7.*"
echo "peers ready"
