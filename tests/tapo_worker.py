"""tapo.py with a scripted reward, for tests that need groups to survive (or not) on chosen ranks.

A random tiny policy never answers correctly, so every group would be filtered. Here the accuracy of a
rollout is 1 for every other rollout on rank 0 (its groups survive) and 0 on other ranks (all filtered),
unless FAKE_REWARD=all-alternate, which makes every rank's groups survive, or FAKE_REWARD=all-wrong (none do).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tapo  # noqa: E402

_count = [0]


def fake_score(response, ground_truth, mode="strict", acc_weight=0.9, fmt_weight=0.1):
    rank = int(os.environ.get("RANK", 0))
    _count[0] += 1
    mode = os.environ.get("FAKE_REWARD")
    alternate = (rank == 0 or mode == "all-alternate") and mode != "all-wrong"
    acc = float(alternate and _count[0] % 2 == 0)
    return {"overall": acc_weight * acc, "format": 0.0, "accuracy": acc}


if __name__ == "__main__":
    tapo.score = fake_score
    tapo.main(sys.argv[1:])
