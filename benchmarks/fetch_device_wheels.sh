#!/usr/bin/env bash
# Wheels the device machine lacks (its image has torch, torchvision, transformers 5, timm, pyarrow,
# numpy, opencv, fsspec; no ray, open_clip or pydantic). Run here, in the repo root.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for spec in open_clip_torch ftfy wcwidth pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl "$spec"
done
du -sh .whl
