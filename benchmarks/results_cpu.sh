#!/usr/bin/env bash
# Issue 7's CPU results table: every method at an equal trainable-parameter budget on the builtin
# SmolLM2-135M-Instruct, trained on real GSM8K (../shared) and evaluated with the base model on GSM8K and two
# LLM-Adapters math sets. Resumable: re-run the same command after an interruption.
# Budget (stated in RESULTS.md): STEPS optimizer steps of 4 examples, EVAL_LIMIT test problems per set.
# Parameter budget per decoder layer (hidden 576, MLP 1536, 7 projections): MoELoRA 8x4 = 365,568;
# LoRA r=36 = 366,336; LoRAMoE r=36 in 4 experts = 386,304; LoRACoE r=18, E=2 = 362,880.
# Every run keeps the papers' alpha = 2r, so the LoRA scaling alpha/r is 2 everywhere.
# ONLY="lora moelora" runs a subset of the rows (same settings) into OUT_DIR / RESULTS_FILE / FIGURES.
set -euo pipefail
cd "$(dirname "$0")/.."
export QMOE_SHARED="${QMOE_SHARED:-$(cd .. && pwd)/shared}" HF_HUB_OFFLINE=1
STEPS=${STEPS:-50}
HALF=$((STEPS / 2))
EVAL_LIMIT=${EVAL_LIMIT:-100}
QMOE=${QMOE:-qmoe}
ONLY=${ONLY:-}
declare -A RUN=(
  [lora]="recipes/gsm8k-lora.yaml"
  [loramoe]="recipes/gsm8k-loramoe.yaml adapter.r=36 adapter.alpha=72"
  [moelora]="recipes/gsm8k.yaml"
  [moelora-no-contrastive]="recipes/gsm8k.yaml adapter.contrastive_loss_weight=0"
  [loracoe]="recipes/gsm8k-loracoe.yaml adapter.r=18 adapter.alpha=36"
  [loracoe-no-warmup]="recipes/gsm8k-loracoe.yaml adapter.r=18 adapter.alpha=36 adapter.stage=joint"
)
declare -A STAGES=(
  [loracoe]="train.stages=[{stage: warmup, max_steps: $HALF, lr: 2.0e-4}, {stage: joint, max_steps: $HALF, lr: 5.0e-5}]"
  [loracoe-no-warmup]="train.stages=[{stage: joint, max_steps: $STEPS, lr: 2.0e-4}]"
)
ORDER=(lora loramoe moelora moelora-no-contrastive loracoe loracoe-no-warmup)
PAIRS=("moelora moelora-no-contrastive" "loracoe loracoe-no-warmup" "loracoe loramoe" "moelora loramoe")
selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
args=()
for label in "${ORDER[@]}"; do
  selected "$label" || continue
  # shellcheck disable=SC2206 # the recipe and its overrides are words
  args+=(--run "$label" ${RUN[$label]})
  if [ -n "${STAGES[$label]:-}" ]; then args+=("${STAGES[$label]}"); fi
done
for pair in "${PAIRS[@]}"; do
  read -r run reference <<<"$pair"
  if selected "$run" && selected "$reference"; then args+=(--pair "$run" "$reference"); fi
done
exec $QMOE compare "${args[@]}" \
  --set model.source=builtin:smollm2-135m-instruct data.path="$QMOE_SHARED/data/gsm8k/train.jsonl" \
        data.limit=$((STEPS * 4)) data.max_length=256 train.max_steps=$STEPS train.batch_size=4 \
        train.gradient_accumulation=1 train.logging_steps=2 train.checkpoint_steps=10 \
        model.gradient_checkpointing=false \
  --eval-tasks gsm8k MultiArith SVAMP --eval-limit "$EVAL_LIMIT" --eval-batch-size 20 --max-new-tokens 192 \
  --out-dir "${OUT_DIR:-runs/compare}" --results "${RESULTS_FILE:-RESULTS.md}" --figures "${FIGURES-docs/figures}"
