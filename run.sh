#!/usr/bin/env bash
# The paper in miniature, end to end on the embedded world (CPU, ~10 minutes on 2 cores):
#   world -> base model (pretraining corpus) -> CoT SFT (+ the answer-only SFT baseline) -> TAPO -> eval.
# Each stage is one line; a stage whose output exists is skipped (delete out/<stage> to redo it).
#   bash run.sh               # single process
#   NPROC=2 bash run.sh       # every training stage under torchrun with 2 processes
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ${NPROC:-1} ))}
NPROC=${NPROC:-1}
SEED=${SEED:-0}
if [ "$NPROC" -gt 1 ]; then RUN="torchrun --nproc_per_node $NPROC"; else RUN="python"; fi
T0=$(date +%s)
stage() {  # stage NAME DONE_PATH CMD...: run CMD unless DONE_PATH exists; time it
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  echo "== $name: $*"; local t=$(date +%s)
  "$@"
  echo "== $name: $(( $(date +%s) - t )) s" | tee -a out/timings.txt
}
mkdir -p out

stage world      out/world/world.json    python world.py --out out/world --seed "$SEED"
stage base       out/base/final          $RUN sft.py --defaults world --variant pretrain --model tiny --data out/world --out out/base --seed "$SEED"
# CoT SFT and its answer-only baseline, each with 30% of the pretraining corpus replayed (README, deviations:
# without it the tiny model collapses onto its 30 memorised rationales and stops reading the image)
stage sft_cot    out/sft_cot/final       $RUN sft.py --model out/base/final --data out/world/cot_sft.json:3,out/world/pretrain.json:0.3 \
                                           --defaults world --max-steps 300 --out out/sft_cot --seed "$SEED"
stage sft_nocot  out/sft_nocot/final     $RUN sft.py --model out/base/final --data out/world/sft_nocot.json:3,out/world/pretrain.json:0.3 \
                                           --defaults world --variant nocot --max-steps 300 --out out/sft_nocot --seed "$SEED"
stage tapo       out/tapo/final          $RUN tapo.py --defaults world --model out/sft_cot/final --data out/world --out out/tapo --seed "$SEED"
for m in base sft_nocot sft_cot tapo; do
  stage "eval_$m" "out/eval/$m/summary.json" $RUN eval.py --model "out/$m/final" --data out/world --out "out/eval/$m" --tag "$m"
done
python eval.py --table out/eval/base:"Base (pretrained)" out/eval/sft_nocot:"SFT w/o CoT" \
  out/eval/sft_cot:"CoT SFT" out/eval/tapo:"CoT SFT + TAPO" --table-out out/results
echo "== total $(( $(date +%s) - T0 )) s (this invocation); stage times in out/timings.txt"
echo "== report: out/results.html (all models side by side), out/eval/<model>/report.html (one each)"
echo "== curves: out/base/curves.png out/sft_cot/curves.png out/sft_nocot/curves.png out/tapo/curves.png"
