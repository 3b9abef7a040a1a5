#!/usr/bin/env bash
# Regenerates requirements/cpu.lock: the exact versions that the README's two commands and CI install.
#   bash requirements/lock.sh            (in a virtualenv of the Python CI uses, 3.11, with pip-tools installed)
# It resolves the `test` and `bench` extras of pyproject.toml (the runtime dependencies come with them)
# against the newest releases inside pyproject's ranges, torch held at the pin below. Review the diff and run
# `bash .ci/run` before committing a new lock. `bash .ci/run --latest` tests the newest releases without
# touching the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0   # the CPU build on CPU machines; the lock says torch==$TORCH, which a CPU wheel index satisfies
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
echo "torch==$TORCH" >"$pins"
CUSTOM_COMPILE_COMMAND="bash requirements/lock.sh" pip-compile --quiet --extra test --extra bench \
  --strip-extras --no-emit-index-url --no-emit-find-links --no-header -c "$pins" \
  -o requirements/cpu.lock.new pyproject.toml
{
  echo "# The exact versions that the README's two commands and CI install (pip install -c requirements/cpu.lock)."
  echo "# Python 3.11, Linux x86-64, CPU. Generated from pyproject.toml's ranges, $(date -u +%Y-%m-%d)."
  echo "# Regenerate: bash requirements/lock.sh (pip-tools installed), review the diff, run bash .ci/run."
  echo "# The newest releases, without this lock: bash .ci/run --latest"
  # a local build label (torch 2.13.0+cpu) is dropped: torch==2.13.0 is what a CPU or CUDA index both satisfy
  # The project itself appears (its extras name posttrain[...]) as a file:// path of this checkout: never
  # pinned, it is installed with -e; its line and the comment lines under it go.
  sed -e 's/^\(torch==[0-9.]*\)+[a-z0-9]*/\1/' -e "s#-c $pins#the torch pin of requirements/lock.sh#" \
    requirements/cpu.lock.new | awk '/^posttrain @ /{skip=1; next} skip && /^ /{next} {skip=0; print}'

} >requirements/cpu.lock
rm requirements/cpu.lock.new
