#!/usr/bin/env bash
# Prepare a GPU lending (benchmarks/device/README.md). Run HERE, where pip reaches the package
# registries (the device machine reaches nothing), from anywhere in the checkout:
#   bash benchmarks/device/prepare.sh
# Fills two folders that git ignores and that each device call carries:
#   .whl/      wheels of what lungseg needs and the device's Python 3.12 lacks
#   .gpudata/  a copy of ../shared/data/lidc_nodules (../shared does not travel)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# The device image has torch, pytorch-lightning, torchmetrics, tensorboard, opencv-python-headless,
# numpy, scipy and PyYAML; these are the rest, at the versions of the project's .venv (the
# README's install) where there is one, so that the device runs what the tests here ran.
names="hydra-core omegaconf antlr4-python3-runtime albumentations albucore pydantic pydantic-core
  annotated-types typing-inspection simsimd stringzilla"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
pins=$("$python" -c '
import importlib.metadata as m, sys
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        out.append(name)
print("\n".join(out))' $names)
rm -rf .whl && mkdir -p .whl .gpudata
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl $(grep -v '^antlr4' <<<"$pins")
# antlr4-python3-runtime is an sdist only on PyPI (pure Python): built into a wheel here.
python3 -m pip wheel -q --no-deps -w .whl "$(grep '^antlr4' <<<"$pins")"
rm -rf .gpudata/lidc_nodules
cp -r ../shared/data/lidc_nodules .gpudata/lidc_nodules
ls .whl
du -sh .whl .gpudata
