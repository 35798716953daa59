#!/usr/bin/env bash
# The paper in miniature, end to end on the embedded world (CPU, about 10 minutes on 2 cores: 512-851 s
# measured on one AMD EPYC host over many sessions; 512-586 s on thirteen runs of the current code, README "Stop 39",
# "Stop 40"):
#   world -> base model (pretraining corpus) -> CoT SFT (+ the answer-only SFT baseline) -> TAPO -> eval.
# Each stage is one line; a stage whose output exists is skipped (delete $OUT/<stage> to redo it).
#   bash run.sh                          # seed 0 into out/
#   SEED=1 OUT=out/seeds/seed1 bash run.sh   # another seed (world split, base, SFT and TAPO together)
#   NPROC=2 bash run.sh                  # every stage under torchrun with 2 processes (the base model and TAPO
#                                        # always train with BASE_NPROC / TAPO_NPROC, default max(NPROC, 2), processes)
#   PRESET=small OUT=out/small bash run.sh   # the 3.5M-parameter preset (presets.py) instead of the 1.2M tiny4
#   PRESET=tiny BASE_EPOCHS=5 WORLD_FLAGS="--name-frac 0.3 --instruct-name-frac 0.4" bash run.sh
#                                        # the previous recipe: the 0.7M model, 5 base epochs, more named images
#   WORLD_FLAGS="--knowledge-repeats 3 --name-frac 0.5 --instruct-name-frac 0.7" SFT_EXTRA="--freeze none" \
#   TAPO_FLAGS="--defaults world --lr 1e-4" BASE_NPROC=1 ANALYSIS_REPLAY=0 COT_STEPS=200 bash run.sh
#                                        # the world and recipe before that (README, "Results", earlier recipes)
#   PACK=0 bash run.sh                   # padded micro-batches instead of packed rows (the realisation before stop 31)
#   SHARE=0 TAPO_FLAGS="--defaults world --old-logprobs recompute" bash run.sh
#                                        # the training of stops 31-37, bit for bit: each packed sample holds its own
#                                        # copy of the prompt prefix, each TAPO response its own prompt, TAPO
#                                        # recomputes pi_old (README, "Stop 38", "Stop 39")
#   TAPO_FLAGS="--defaults world --no-share-prompt" bash run.sh   # stop 38's training
# With one process per stage (NPROC=1, the default) independent stages share the two cores: the answer-only SFT
# and the first two evaluations run beside CoT SFT, and CoT SFT's evaluation beside TAPO's, in the background (logs
# in $OUT/logs/); SERIAL=1 runs everything in the foreground, one stage after the other. Results do not depend on it.
# The world's hyper-parameters are the explicit flags below (README, "The embedded world").
set -euo pipefail
cd "$(dirname "$0")"
NPROC=${NPROC:-1}
SEED=${SEED:-0}
OUT=${OUT:-out}
# one thread per process unless told otherwise: on a shared 2-core CPU two threads per process ran ~10x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --standalone: a free port per job, so that seeds can run side by side (ablate.sh PARALLEL=1)
if [ "$NPROC" -gt 1 ]; then RUN="torchrun --standalone --nproc_per_node $NPROC"; else RUN="python"; fi
# The base model has no stage to share the machine with: it trains under DDP on both cores (BASE_NPROC=1: one
# process; the two give the same model up to float summation order)
BASE_NPROC=${BASE_NPROC:-$(( NPROC > 1 ? NPROC : 2 ))}
if [ "$BASE_NPROC" -gt 1 ]; then RUN_BASE="torchrun --standalone --nproc_per_node $BASE_NPROC"; else RUN_BASE="python"; fi
# TAPO too (TAPO_NPROC=1: one process; its rollouts are seeded by rank, so the two are two draws of the same run)
TAPO_NPROC=${TAPO_NPROC:-$(( NPROC > 1 ? NPROC : 2 ))}
if [ "$TAPO_NPROC" -gt 1 ]; then RUN_TAPO="torchrun --standalone --nproc_per_node $TAPO_NPROC"; else RUN_TAPO="python"; fi
T0=$(date +%s)
stage() {  # stage NAME DONE_PATH CMD...: run CMD unless DONE_PATH exists; time it, with its number of processes
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  local procs=1 prev="" a
  for a in "$@"; do if [ "$prev" = --nproc_per_node ]; then procs=$a; fi; prev=$a; done
  echo "== $name: $*"; local t=$(date +%s)
  "$@"
  local unit=processes; if [ "$procs" = 1 ]; then unit=process; fi
  echo "== $name: $(( $(date +%s) - t )) s on $procs $unit" | tee -a "$OUT/timings.txt"
}
PIDS=()
# a failed or interrupted run leaves no background stage behind
trap 'for p in "${PIDS[@]}"; do pkill -P "$p"; kill "$p"; done 2>/dev/null || true' EXIT
beside() {  # beside NAME FUNC ARGS...: FUNC ARGS in the background (output in $OUT/logs/NAME.log) on the other core
  local name=$1 log=$OUT/logs/$1.log; shift
  if [ "$NPROC" -gt 1 ] || [ "${SERIAL:-0}" = 1 ]; then "$@"; return; fi
  mkdir -p "$OUT/logs"; echo "== $name: in the background, log $log"
  "$@" > "$log" 2>&1 &
  PIDS+=($!)
}
join() {  # wait for the background stages; stop the run if one failed
  local p
  for p in "${PIDS[@]}"; do wait "$p" || { echo "== a background stage failed: see $OUT/logs/" >&2; exit 1; }; done
  PIDS=()
}
mkdir -p "$OUT"
W=$OUT/world

# a world folder left by a run with another seed or other world flags would be reused, with every stage after it
if [ -e $W/world.json ]; then python world.py --check --out $W --seed "$SEED" ${WORLD_FLAGS:-}; fi
stage world      $W/world.json           python world.py --out $W --seed "$SEED" ${WORLD_FLAGS:-}
# packed rows (sft.py --pack, tapo.py --replay-pack: the world profile's default) or, with PACK=0, padded micro-batches
if [ "${PACK:-1}" = 0 ]; then SFT_PACK="--no-pack"; TAPO_PACK="--no-replay-pack"; else SFT_PACK=""; TAPO_PACK=""; fi
# with packed rows, the prompt tokens every sample starts with are held once per row (sft.py --share-prefix, tapo.py
# --replay-share-prefix: the same loss up to float rounding, fewer tokens), and TAPO's teacher-forced forwards run
# each (group, image) prompt once for its responses (tapo.py --share-prompt); SHARE=0: each sample holds its own copy
if [ "${SHARE:-1}" = 0 ]; then
  SFT_PACK="$SFT_PACK --no-share-prefix"; TAPO_PACK="$TAPO_PACK --no-replay-share-prefix --no-share-prompt"
fi
stage base       $OUT/base/final         $RUN_BASE sft.py --defaults world --variant pretrain --model ${PRESET:-tiny4} --data $W --out $OUT/base --seed "$SEED" \
                                           --epochs ${BASE_EPOCHS:-8} $SFT_PACK
# CoT SFT and its answer-only baseline: the same images, prompts and lr, each with a replay of half of
# replay.json, the pretraining corpus minus its short prompt-format samples (README, deviations: the tiny model
# otherwise forgets what the base knew; the base's short answers would compete with the rationale)
# (--defaults world freezes the vision tower and projector, as the release's SFT, and the token embeddings and the
# decoder's MLPs, so that the language model keeps its knowledge of the unseen classes; SFT_EXTRA adds flags to both)
# CoT SFT also replays the pretraining images' descriptions as the rationale's visual analysis, 3 times
# (analysis_replay.json, README Δ: fitted to 30 images, the analysis otherwise drifts to the seen classes), in
# twice the steps: its mixture is twice as large, so both SFTs make the same number of passes over their data
# (ANALYSIS_REPLAY=0 COT_STEPS=200: the previous recipe, without it)
SFT_FLAGS="--defaults world --lr ${SFT_LR:-5e-4} --warmup-steps 10 $SFT_PACK ${SFT_EXTRA:-}"
AR_DATA=""; if [ "${ANALYSIS_REPLAY:-3}" != 0 ]; then AR_DATA=",$W/analysis_replay.json:${ANALYSIS_REPLAY:-3}"; fi
evaluate() {  # evaluate MODEL...: closed- and open-world, seen and unseen, into $OUT/eval/MODEL
  local m
  for m in "$@"; do
    stage "eval_$m" "$OUT/eval/$m/summary.json" $RUN eval.py --defaults world --model "$OUT/$m/final" --data $W \
      --out "$OUT/eval/$m" --tag "$m"
  done
}
nocot_then_evals() {
  stage sft_nocot $OUT/sft_nocot/final $RUN sft.py --model $OUT/base/final \
    --data $W/sft_nocot.json:4,$W/replay.json:${REPLAY:-0.5} \
    $SFT_FLAGS --max-steps ${SFT_STEPS:-200} --variant nocot --out $OUT/sft_nocot --seed "$SEED"
  evaluate base sft_nocot
}
beside sft_nocot nocot_then_evals
stage sft_cot    $OUT/sft_cot/final      $RUN sft.py --model $OUT/base/final \
                                           --data $W/cot_sft.json:4,$W/replay.json:${REPLAY:-0.5}$AR_DATA \
                                           $SFT_FLAGS --max-steps ${COT_STEPS:-400} --out $OUT/sft_cot --seed "$SEED"
join
TAPO_FLAGS=${TAPO_FLAGS:-"--defaults world"}
stage tapo       $OUT/tapo/final         $RUN_TAPO tapo.py --model $OUT/sft_cot/final --data $W --out $OUT/tapo --seed "$SEED" $TAPO_FLAGS $TAPO_PACK
beside eval_sft_cot evaluate sft_cot
evaluate tapo
join
# eval.py --table's tables, without loading the model stack
python report.py $OUT/eval/base:"Base (pretrained)" $OUT/eval/sft_nocot:"SFT w/o CoT" \
  $OUT/eval/sft_cot:"CoT SFT" $OUT/eval/tapo:"CoT SFT + TAPO" --out $OUT/results
echo "== total $(( $(date +%s) - T0 )) s (this invocation); stage times in $OUT/timings.txt"
# every stage runs one single-threaded process per core it holds, so the run's work is the sum of stage seconds x
# processes; on 2 cores no schedule takes less than half of it (README, "Stop 32": run.sh stays within 2.5% of that)
awk '/^== .*: [0-9]+ s on [0-9]+ process/ { w += $(NF-4) * $(NF-1) }
     END { if (w) printf "== work: %d core-seconds (stage seconds x processes, timings.txt); on 2 cores at least %d s\n", w, w / 2 }' "$OUT/timings.txt"
echo "== report: $OUT/results.html (all models side by side), $OUT/eval/<model>/report.html (one each)"
echo "== curves: $OUT/base/curves.png $OUT/sft_cot/curves.png $OUT/sft_nocot/curves.png $OUT/tapo/curves.png"
