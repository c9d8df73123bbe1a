#!/usr/bin/env bash
# Validate qmoe on a machine with one CUDA GPU, from a fresh clone, in one command (about 15-25 minutes):
# setup (.venv with the CUDA torch wheel), qmoe doctor, the GPU tests (pytest -m gpu), the quick CUDA benchmark
# plan with and without the Triton kernels (time and max_memory_allocated vs PEFT LoRA), the quickstart recipe
# end to end on CUDA in bf16 (peak memory, training tokens/s), chat generation tokens/s (base vs each method's
# adapter; again with the decode step compiled), and summary.md, ready to paste into BENCHMARKS.md. Everything
# goes into one folder, $OUT.
#
#   bash benchmarks/gpu_validation.sh             # the GPU run; without CUDA it stops at once with exit status 3
#   bash benchmarks/gpu_validation.sh --dry-run   # the same steps on CPU with tiny sizes (a few minutes)
#
# Each step's output is $OUT/STEP.log and its exit status and seconds a line of $OUT/steps.tsv. A failing step
# does not stop the others (their results are still worth having); the script then exits 1 naming it.
# Environment: OUT (the folder), CUDA_TORCH (the torch wheel), SETUP (1: run scripts/setup.sh, the default of
# a GPU run; 0: skip it; a dry run skips it when .venv exists), HF_HUB_OFFLINE (default 1: the builtin model and
# the packaged data, reproducible).
set -uo pipefail
cd "$(dirname "$0")/.."

# the one place the CUDA build of torch is named (scripts/setup.sh installs it as QMOE_TORCH)
CUDA_TORCH=${CUDA_TORCH:-"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"}

DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_validation.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-gpu-validation-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
: >"$OUT/steps.tsv"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TQDM_DISABLE=1 PYTHONUNBUFFERED=1
export QMOE_CACHE=${QMOE_CACHE:-$HOME/.cache/qmoe}
PY=.venv/bin/python
FAILED=()
START=$SECONDS

say() { echo "$*" | tee -a "$OUT/run.log"; }
die() {
  echo "gpu_validation.sh: $*" | tee -a "$OUT/run.log" >&2
  exit 3
}

# step NAME TIMEOUT_S COMMAND...: COMMAND's output in $OUT/NAME.log; its status and seconds in steps.tsv
step() {
  local name=$1 limit=$2
  shift 2
  say "== $name: $*"
  echo "\$ $*" >"$OUT/$name.log"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$? took=$((SECONDS - start))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$OUT/steps.tsv"
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name")
    [ "$rc" -eq 124 ] && say "!! $name timed out after ${limit}s"
    say "!! $name FAILED (exit $rc after ${took}s); the end of $OUT/$name.log:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/run.log"
  else
    say "   ok in ${took}s"
  fi
  return "$rc"
}

skipped() {
  say "== $1: skipped ($2)"
  printf '%s\tskipped\t0\n' "$1" >>"$OUT/steps.tsv"
}

say "gpu_validation.sh$([ $DRY = 1 ] && echo ' --dry-run'): writing into $OUT"

if [ $DRY = 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  # before setup touches anything: no NVIDIA driver, no GPU run
  die "CUDA is missing: no nvidia-smi (NVIDIA driver) on this machine; this script validates a GPU (--dry-run runs its steps on CPU)"
fi

# ---- setup ---------------------------------------------------------------------------------------------
if [ "${SETUP:-}" = 0 ]; then
  skipped setup "SETUP=0"
elif [ $DRY = 1 ]; then
  if [ -x $PY ] && [ "${SETUP:-}" != 1 ]; then
    skipped setup "dry run and .venv exists; SETUP=1 runs scripts/setup.sh anyway"
  else
    step setup 1500 bash scripts/setup.sh || die "setup failed (see $OUT/setup.log)"
  fi
else
  torch_wheel=$CUDA_TORCH
  # a .venv made earlier with the CPU wheel: pip would keep it (2.13.0+cpu satisfies ==2.13.0), so replace it
  if [ -x $PY ] && ! $PY -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    torch_wheel="$CUDA_TORCH --force-reinstall"
  fi
  step setup 1500 env QMOE_TORCH="$torch_wheel" bash scripts/setup.sh || die "setup failed (see $OUT/setup.log)"
fi
[ -x $PY ] || die "no .venv/bin/python after setup"

# ---- the device ------------------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  DEVICE=cpu
  # the Triton kernels run in their interpreter, and auto may pick them for CPU tensors (a test-only switch),
  # so the dry run goes through the same kernel self-check and fused paths as the GPU run
  export TRITON_INTERPRET=1 QMOE_KERNELS_AUTO_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  unset QMOE_KERNELS
else
  DEVICE=cuda
  unset TRITON_INTERPRET QMOE_KERNELS_AUTO_INTERPRET QMOE_KERNELS
  step cuda 120 $PY -c '
import torch
assert torch.version.cuda, f"torch {torch.__version__} is a CPU build"
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
print(torch.cuda.get_device_name(), f"CUDA {torch.version.cuda}")' ||
    die "CUDA is missing: $(tail -n 1 "$OUT/cuda.log") -- this script validates a GPU (--dry-run runs it on CPU)"
  command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
fi

# ---- checks and tests --------------------------------------------------------------------------------------
DOCTOR=(-m qmoe doctor --runs-dir "$OUT")
[ $DRY = 0 ] && DOCTOR+=(--gpu)
step doctor 300 $PY "${DOCTOR[@]}"
$PY "${DOCTOR[@]}" --json >"$OUT/doctor.json" 2>>"$OUT/doctor.log"

# on CPU every GPU test skips (the dry run checks they are collected); on the GPU none may skip
step gpu-tests 900 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests &&
  if [ $DRY = 0 ]; then step gpu-tests-ran 60 $PY benchmarks/gpu_validation.py tests-ran "$OUT/gpu-tests.xml"; fi

# ---- benchmarks ------------------------------------------------------------------------------------------------
TINY=()
[ $DRY = 1 ] && TINY=(--tiny)
step bench-triton 1200 $PY benchmarks/gpu_validation.py bench --device $DEVICE "${TINY[@]}" \
  --json "$OUT/bench-triton.json" --markdown "$OUT/bench-triton.md"
# the kernels only serve MoELoRA and LoRACoE: the other methods' rows would repeat the first run
step bench-torch 900 env QMOE_KERNELS=torch $PY benchmarks/gpu_validation.py bench --device $DEVICE "${TINY[@]}" \
  --methods moelora loracoe --json "$OUT/bench-torch.json" --markdown "$OUT/bench-torch.md"

# ---- the quickstart recipe end to end ----------------------------------------------------------------------
if [ $DRY = 1 ]; then
  QUICKSTART=(model.device=cpu model.compute_dtype=float32 train.max_steps=2 train.logging_steps=1
    train.checkpoint_steps=2 data.limit=4 eval.limit=2 eval.batch_size=2 eval.max_new_tokens=8)
else
  QUICKSTART=(model.device=cuda model.compute_dtype=bfloat16)
fi
step quickstart 900 $PY -m qmoe finetune recipes/quickstart.yaml --output-dir "$OUT/quickstart" --overwrite \
  "${QUICKSTART[@]}"

# ---- chat generation speed ------------------------------------------------------------------------------------
GENERATION=()
[ $DRY = 1 ] && GENERATION=(--new-tokens 8 --repeats 1 --warmup 0)
step generation 600 $PY benchmarks/generation_speed.py --device $DEVICE "${GENERATION[@]}" \
  --json "$OUT/generation.json" --markdown "$OUT/generation.md"

# the compiled decode step (qmoe chat --compile): whether torch.compile pays on this GPU (on CPU: BENCHMARKS.md)
if [ $DRY = 1 ]; then
  skipped generation-compiled "dry run: compiling the builtin model takes minutes on a CPU"
else
  step generation-compiled 900 $PY benchmarks/generation_speed.py --device $DEVICE --methods moelora lora \
    --batch-sizes 1 --compile --json "$OUT/generation-compiled.json" --markdown "$OUT/generation-compiled.md"
fi

# ---- summary ------------------------------------------------------------------------------------------------------
SUMMARY=()
[ $DRY = 1 ] && SUMMARY=(--dry-run)
$PY benchmarks/gpu_validation.py summary "$OUT" "${SUMMARY[@]}" >/dev/null 2>"$OUT/summary.log" ||
  FAILED+=(summary)
say "---- $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null | tee -a "$OUT/run.log"
say "---- $((SECONDS - START)) s in all"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
say "all steps passed (results in $OUT)"
