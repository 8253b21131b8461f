#!/usr/bin/env bash
# The headline serving run on a lent H100 machine (16 cores, no package registry).
#
# Prepared on the development machine into the ignored folder .devcarry/ (see RESULTS.md):
#   whl/      grpcio, grpcio-health-checking, protobuf, onnxruntime-genai wheels for cp312
#   libonnxruntime.so.1.32.0.xz   the ORT library genai 0.18 needs (the machine has ORT 1.30)
#   home/artifacts/<edge version>-int4   the edge artifact, exported here
#   trace/    the Azure conversation trace
# Then: run(command="bash benchmarks/h100_serving.sh", carry=[".devcarry"]).
set -euo pipefail
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
