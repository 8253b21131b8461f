#!/usr/bin/env bash
# The headline serving run on a lent GPU machine (16 cores, Python 3.12, no package registry).
#
# Here, first:   bash benchmarks/h100_serving.sh prepare
#   fills the ignored folder .devcarry/ with what that machine lacks: cp312 wheels (grpcio,
#   grpcio-health-checking, protobuf, onnxruntime-genai, redis, prometheus-client, psutil), the
#   ORT 1.32 library genai 0.18 needs (the machine has ORT 1.30; xz-compressed to fit the
#   64 MiB carry limit), the int4 edge artifact, and the Azure conversation trace.
# Then:          run(command="bash benchmarks/h100_serving.sh", carry=[".devcarry"])
set -euo pipefail
if [ "${1:-}" = prepare ]; then
  rm -rf .devcarry && mkdir -p .devcarry/whl .devcarry/trace .devcarry/ort
  grep -q '^/.devcarry/' .git/info/exclude || echo /.devcarry/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .devcarry/whl grpcio==1.85.3 \
    grpcio-health-checking==1.78.0 protobuf==6.33.6 onnxruntime-genai==0.18.0 redis==8.1.0 \
    prometheus-client==0.26.0 psutil==7.2.2
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .devcarry/ort onnxruntime==1.32.0
  unzip -q -o .devcarry/ort/*.whl 'onnxruntime/capi/libonnxruntime.so.1.32.0' -d .devcarry/ort
  xz -T2 -9 -c .devcarry/ort/onnxruntime/capi/libonnxruntime.so.1.32.0 \
    > .devcarry/libonnxruntime.so.1.32.0.xz
  rm -rf .devcarry/ort
  python3 -c "from pathlib import Path; from tandem.commands.up_cmd import ensure_edge_artifact; \
ensure_edge_artifact(Path('.devcarry/home'), 'int4')"
  cp ../shared/data/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv .devcarry/trace/
  du -sh .devcarry
  exit 0
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl
# genai finds ORT through the `onnxruntime` package's capi folder: give it one holding 1.32.
mkdir -p /tmp/slim/onnxruntime/capi && touch /tmp/slim/onnxruntime/__init__.py
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.devcarry/libonnxruntime.so.1.32.0.xz'), open('/tmp/slim/onnxruntime/capi/libonnxruntime.so.1.32.0', 'wb'))"
export PYTHONPATH=/tmp/slim:/tmp/site:$PWD TANDEM_TRACE_DIR=$PWD/.devcarry/trace
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, grpc, onnxruntime_genai; print('torch', torch.__version__, 'grpc', grpc.__version__, 'genai', onnxruntime_genai.__version__)"
# The GPU path must give the reference path's greedy tokens before anything is timed.
python3 benchmarks/cloud_cuda_check.py
python3 benchmarks/serving.py --device cuda --levels "${LEVELS:-25,50,100,200,400,800}" \
  --duration "${DURATION:-15}" --edges 4 --edge-concurrency 4 --cloud-slots 128 \
  --cloud-queue 256 --channels 8 --timeout 30 \
  --cpus 'cloud=0-3;edge=4-11;router=12-13;client=14-15' \
  --home .devcarry/home --out "$OUT/serving-h100.json" 2>&1 | tee "$OUT/serving-h100.log" \
  | grep -v '^20'
tar czf "$OUT/server-logs.tgz" -C .devcarry/home --exclude artifacts .
