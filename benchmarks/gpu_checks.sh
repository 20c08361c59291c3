#!/usr/bin/env bash
# Every GPU check of the project in one run on the device machine (one H200; no Ray there, so the
# benchmarks call the operator classes directly). Prepare the wheels here first:
#     bash benchmarks/fetch_device_wheels.sh            # -> .whl/ (git-ignored, ~10 MB)
# then run this with the device tool: command "bash benchmarks/gpu_checks.sh", carry [".whl"],
# timeout_s 540. Output goes to stdout and to $OUT/gpu_checks.log. Budget: about 6 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1
LOG="${OUT:-/tmp}/gpu_checks.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "== clip_bench gpu (issue 3)"
  timeout 150 python3 benchmarks/clip_bench.py gpu --model ViT-B-32 --n 16384 --batch 1024
  echo "== reward_bench gpu (issue 4)"
  timeout 120 python3 benchmarks/reward_bench.py gpu --model ViT-B-32 --n 8192 --batch 1024
  echo "== recaption_bench gpu (issue 5)"
  timeout 150 python3 benchmarks/recaption_bench.py gpu --n 2048 --batch 128 --single 64 --tokens 32
  echo "== GPU tests"
  timeout 90 python3 -m pytest -q -m gpu tests/test_clip.py tests/test_recaption.py -p no:cacheprovider
} 2>&1 | tee "$LOG"
