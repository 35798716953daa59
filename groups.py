"""Where TAPO's learning signal sits on the embedded world: the perception or the lookup?

    python groups.py --world out/world out/sft_cot/final out/tapo/final             # 64 groups per checkpoint
    python groups.py --world out/seeds/seed13/world out/seeds/seed13/sft_cot/final --rows 128 --seed 1

For each checkpoint this draws TAPO's groups on the world's rl_train.jsonl with tapo.py's own sampler and world
defaults (5 rollouts on the anchor and 5 on the positive image, temperature 1.0, top-p 0.99, the strict reward; a
seeded sample of rows) and reads their rationales back (diagnose.group_signal). Only a group with both right and
wrong answers survives dynamic sampling and carries an advantage. In such a group the reward varies with the
perception when the rollouts disagree on whether the visual analysis is right, and otherwise with the lookup
(candidates -> comparison -> prediction) after the same analysis: RL can sharpen a perception that unseen classes
share only through the first kind. A rollout whose analysis is wrong and whose answer is right is rewarded for an
answer its own rationale does not support. A diagnostic (README "Results", stop 27), not an evaluation.
"""
import argparse
import random
import sys

import torch
from tqdm import tqdm

import diagnose
import tapo
from policy import load_policy


def draw_groups(ckpt, world_dir, rows, seed=0, progress=False, flags=()):
    """TAPO's groups from a checkpoint on `rows` training rows of the world (a seeded sample), with tapo.py's sampler
    and world defaults (`flags`: more tapo.py flags). -> [(ground truth, [(rollout text, accuracy)])], anchor
    rollouts first."""
    args = tapo.get_args(["--model", str(ckpt), "--data", str(world_dir), "--defaults", "world", "--seed", str(seed),
                          *flags])
    data = tapo.load_stage2(args.data, args.image_root)
    random.Random(seed).shuffle(data)
    data = data[:rows]
    model, processor = load_policy(args.model, dtype=torch.float32)
    model.eval()
    out = []
    for i in tqdm(range(0, len(data), args.rollout_batch), disable=not progress, desc=str(ckpt), leave=False):
        groups, _ = tapo.sample_groups(model, processor, data[i:i + args.rollout_batch], args, None,
                                       (seed * 1_000_003 + i) * 100_000)
        out += [(g.row.answer, [(s.text, s.accuracy) for s in g.samples]) for g in groups]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="HF folders of world policies (CoT SFT, TAPO, ...)")
    ap.add_argument("--world", required=True, help="the world folder they were trained on (world.json, rl_train.jsonl)")
    ap.add_argument("--rows", type=int, default=64, help="training rows, one group each, per checkpoint (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the row sample and of the rollouts (default 0)")
    args = ap.parse_args(argv)
    try:
        classes, _ = diagnose.load_world(args.world)
        lines = list(diagnose.GROUP_HEADER)
        for ck in args.checkpoints:
            lines.append(diagnose.group_row(ck, diagnose.group_signal(
                draw_groups(ck, args.world, args.rows, args.seed, progress=True), classes)))
    except (OSError, ValueError) as e:
        ap.exit(2, f"groups.py: error: {e}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
