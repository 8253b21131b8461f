#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist into its own virtual environment.
#
# llama.cpp is the baseline the edge runtime is measured against, never a
# dependency of Tandem: it gets a venv of its own (.venv-llamacpp, gitignored)
# so nothing it pulls in can leak into Tandem's environment.
#
# --no-binary forces a local compile, so the kernels are built for this CPU
# (GGML_NATIVE, the default) rather than a generic wheel's. The [server] extra
# brings the OpenAI-compatible server for later end-to-end tests.
#
# Usage: benchmarks/llamacpp_env.sh [venv-dir]      (about 10-20 min on 2 cores)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
VENV="${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv-llamacpp}"
PYTHON="${PYTHON:-python3}"

for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install cmake build-essential" >&2; exit 1; }
done

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# nice: the build shares the machine with everything else; -j follows the cores.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  nice -n 10 "$VENV/bin/pip" install --verbose --no-binary llama-cpp-python \
  "llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION}"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
