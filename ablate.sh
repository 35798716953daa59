#!/usr/bin/env bash
# TAPO ablations on the embedded world (longer than the main job: ~6 variants x 3 seeds x ~3 min on 2 cores).
# Needs the main job's CoT-SFT checkpoint (bash run.sh). Each variant trains TAPO from out/sft_cot/final with
# one change, is evaluated closed- and open-world, and the per-seed results are tabled side by side
# (out/ablate/results.md); mean and spread over seeds are in out/ablate/summary.json.
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-"0 1 2"}
[ -e out/sft_cot/final ] || { echo "no out/sft_cot/final: run 'bash run.sh' first"; exit 1; }
declare -A FLAGS=(
  [tapo]=""                                  # full TAPO: 5 + 5 rollouts, inter-class KL, release conditioning
  [no_intra]="--no-intra"                    # 10:0, all rollouts on the anchor
  [no_inter]="--no-inter"                    # gamma = eta2 = 0, no negative image
  [dapo]="--no-intra --no-inter"             # plain DAPO
  [cond_anchor]="--intra-condition anchor"   # paper's conditioning of positive rollouts (Δ1)
  [reward_official]="--reward official"      # the release's substring reward (Δ10)
)
specs=()
for v in tapo no_intra no_inter dapo cond_anchor reward_official; do
  for s in $SEEDS; do
    out=out/ablate/$v/seed$s
    [ -e "$out/final" ] || python tapo.py --defaults world --model out/sft_cot/final --data out/world --out "$out" --seed "$s" ${FLAGS[$v]}
    [ -e "out/ablate/eval/$v.seed$s/summary.json" ] || \
      python eval.py --model "$out/final" --data out/world --out "out/ablate/eval/$v.seed$s" --tag "$v seed $s"
    specs+=("out/ablate/eval/$v.seed$s:$v seed $s")
  done
done
python eval.py --table "${specs[@]}" --table-out out/ablate/results
python - <<'PY'
import json, statistics, glob, collections
rows = collections.defaultdict(list)
for f in glob.glob("out/ablate/eval/*/summary.json"):
    s = json.load(open(f)); v = f.split("/")[-2].split(".seed")[0]
    rows[v].append({k: s["closed"][k]["avg"]["acc"] for k in ("seen", "unseen")} |
                   {"open_" + k: s["open"][k]["avg"]["exact"] for k in ("seen", "unseen")})
out = {v: {k: (statistics.mean(x[k] for x in r), statistics.pstdev([x[k] for x in r])) for k in r[0]} for v, r in rows.items()}
json.dump(out, open("out/ablate/summary.json", "w"), indent=1)
print("| variant | " + " | ".join(next(iter(out.values())).keys()) + " |")
for v, m in sorted(out.items()):
    print(f"| {v} | " + " | ".join(f"{a:.1f} ± {b:.1f}" for a, b in m.values()) + " |")
PY
