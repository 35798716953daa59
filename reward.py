"""
Rule-based reward for TAPO rollouts: R = 0.9 * accuracy + 0.1 * format.

Fine-R1 (He, Geng, Peng, ICLR 2026, arXiv 2602.07605) trains with an R1-style reward on
`<think>...</think><answer>LABEL</answer>` responses. The paper names only the accuracy check; the
release (github.com/PKU-ICST-MIPL/FineR1_ICLR2026, TAPO/examples/reward_function/cls_thinking.py) adds a
format term with weight 0.1 (README "Release facts"). This file is pure Python (no torch), meant to be
called by tapo.py on every rollout. It also holds EVERY answer parser and label normaliser of the project,
each named for the rule it follows (data.py and eval.py import them from here):

    strict_answer(text)        last complete <answer> block            (our strict reward)
    release_rl_answer(text)    first <answer> block, lazy, after the tag-space clean-up (release RL reward)
    release_eval_answer(text)  first <answer> to last </answer>, greedy (release eval script)
    strict_label(s)            lower, _/- -> space, punctuation dropped, spaces collapsed (strict reward)
    strict_canonical(s)        strict_label + one leading article dropped  (strict reward)
    release_label(s)           lower, _ -> space                         (release RL and eval scripts)

    python reward.py "<think>white head</think><answer>Laysan Albatross</answer>" "Laysan Albatross"
    python reward.py RESPONSE GROUND_TRUTH --mode official

Format reward ("strict"; "official" uses the release's check, official_format): 1.0 iff, after str.strip(),
the response is exactly
    <think> THINK </think> WS <answer> ANSWER </answer>
with WS only whitespace and each of the four tags present exactly once in the whole response (so no
duplicate blocks, no nesting, no text before <think> or after </answer>). THINK and ANSWER may be empty.
Tags are case-sensitive, as in the release.

Accuracy reward, two modes (REWARD_MODES):
- "strict" (default): the response has exactly one <answer>...</answer> block and its content names the
  class and nothing else: strict_label(answer) == strict_label(ground truth), after dropping one
  leading article ("the", "a", "an") on both sides. Trailing periods, case, "_", "-" and spacing are
  forgiven by strict_label. Lists ("A, B", "A or B", "A/B", "A and B", one per line), hedges
  ("either A or B") and extra words ("A (Phoebastria nigripes)") all fail equality, so listing classes
  cannot be rewarded.
- "official": the release's RL reward exactly (TAPO/examples/reward_function/cls_thinking.py): whitespace
  around "<", ">" and "/" removed, then format = fullmatch of <think>.*?</think>\\s*<answer>.*?</answer>
  and accuracy = `gt.lower() in answer.lower()` on the first <answer> block. It rewards any answer that
  contains the label, so listing candidates is rewarded (Δ10). Kept to reproduce the release.

Deliberate deviations from the release (strict mode; "official" has none):
1. Default accuracy is "strict", not substring inclusion (Δ10; Visual-RFT users saw policies collapse to
   listing classes under substring rewards).
2. The format check counts tags: the release's `fullmatch(<think>.*?</think>\\s*<answer>.*?</answer>)`
   also accepts duplicated or nested blocks, e.g. `<think>a</think><answer>b</answer><answer>c</answer>`.
3. The release removes whitespace around every "<", ">" and "/" before scoring (for Qwen2.5-VL-32B's
   "< think >"); strict mode does not: it only strips the ends and allows whitespace between </think>
   and <answer>. "official" mode keeps the clean-up for its accuracy check.
4. A response with no <answer> block earns accuracy 0 in both modes, as in the release RL reward. The
   release *eval* script instead scores the whole output when the tag is missing (README "Release facts");
   eval.py does that itself. For RL it would reward labels named anywhere in the thinking.
5. An empty ground truth (or a non-str one, coerced to "") earns accuracy 0 in strict mode; the release's
   `"" in answer` gives 1, and so does "official".
6. No regex scans unbounded text with a lazy quantifier from every start position: answers are found
   with str.rfind/find and the format regex runs only once every tag count is known to be 1, so scoring
   is linear in the response length (a 200k-char rollout of repeated "<think>" takes about a millisecond).
"""
import argparse
import json
import re

REWARD_MODES = ("strict", "official")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# note: only applied once every tag occurs exactly once, so each lazy .*? has a single place to stop
# and the match is linear in the response length.
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
SPACE_LIKE_RE = re.compile(r"[_\-\u2010-\u2015]")  # "_", "-" and unicode dashes become a space
PUNCT_RE = re.compile(r"[^\w\s]")  # anything not a letter, digit, "_" or whitespace is dropped
WHITESPACE_RE = re.compile(r"\s+")
ARTICLE_RE = re.compile(r"^(?:the|a|an) ")
# release: re.sub(r"\s*(<|>|/)\s*", r"\1", response) ("handle qwen2.5vl-32b format"); this form deletes the
# same whitespace but only matches where there is some, ~10x faster on a long run of "<" or "/".
RELEASE_TAG_SPACE_RE = re.compile(r"\s+(?=[<>/])|(?<=[<>/])\s+")


def as_str(x) -> str:
    """Rollouts and labels are strings; anything else (None, ints, bytes) scores as the empty string."""
    return x if isinstance(x, str) else ""


# -----------------------------------------------------------------------------
# Parsing

def format_reward(response) -> float:
    """1.0 iff the response is one <think> block then one <answer> block (see module docstring)."""
    text = as_str(response).strip()
    if any(text.count(tag) != 1 for tag in TAGS):
        return 0.0
    return 1.0 if FORMAT_RE.fullmatch(text) else 0.0


def strict_answer(response) -> str | None:
    """Strict rule: stripped text of the last <answer>...</answer> block, or None without a complete block."""
    text = as_str(response)
    end = text.rfind(ANSWER_CLOSE)
    if end == -1:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start == -1:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


def strict_label(s) -> str:
    """Strict rule: lower case, "_"/"-" -> space, other punctuation dropped, whitespace collapsed and stripped.

    "Black_footed albatross" and "Black-Footed  Albatross." both become "black footed albatross";
    "Brewer's Sparrow" becomes "brewers sparrow", "F/A-18" becomes "fa 18".
    """
    s = as_str(s).lower()
    s = SPACE_LIKE_RE.sub(" ", s)
    s = PUNCT_RE.sub("", s)
    return WHITESPACE_RE.sub(" ", s).strip()


def strict_canonical(s) -> str:
    """Strict rule: strict_label plus one leading article removed: "The Laysan Albatross." -> "laysan albatross"."""
    return ARTICLE_RE.sub("", strict_label(s), count=1)


def release_rl_answer(response) -> str | None:
    """Release RL reward's parse: whitespace around "<", ">" and "/" removed, then the first
    <answer>...</answer> block (lazy), stripped; None without one. Same span as the release's
    re.search(r"<answer>(.*?)</answer>", DOTALL), without its O(n^2) worst case."""
    text = RELEASE_TAG_SPACE_RE.sub("", as_str(response))
    start = text.find(ANSWER_OPEN)
    if start == -1:
        return None
    end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    if end == -1:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


def release_eval_answer(output) -> str | None:
    """Release eval script's parse, re.search(r'<answer>(.*)</answer>', DOTALL).group(1).strip(): from the
    FIRST <answer> to the LAST </answer> (greedy); None without a complete pair."""
    text = as_str(output)
    s, e = text.find(ANSWER_OPEN), text.rfind(ANSWER_CLOSE)
    if s == -1 or e < s + len(ANSWER_OPEN):
        return None
    return text[s + len(ANSWER_OPEN):e].strip()


def release_label(s) -> str:
    """Release label normalisation (RL and eval scripts): lower case, "_" -> " " (no stripping)."""
    return str(s).lower().replace("_", " ")


# -----------------------------------------------------------------------------
# Accuracy

def strict_accuracy(response, ground_truth) -> float:
    """1.0 iff exactly one <answer> block whose content is the ground-truth class and nothing else."""
    text = as_str(response)
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return 0.0  # missing, or several answer blocks (a hedge across blocks)
    answer = strict_answer(text)
    if answer is None:
        return 0.0  # "</answer> ... <answer>": the close tag comes first
    target = strict_canonical(ground_truth)
    return 1.0 if target and strict_canonical(answer) == target else 0.0


def official_accuracy(response, ground_truth) -> float:
    """The release's RL check: gt.lower() in answer.lower(), answer = release_rl_answer (first block) (Δ10).
    Exactly the release, edge cases included: an empty ground truth is "in" any answer."""
    answer = release_rl_answer(response)
    if answer is None or not isinstance(ground_truth, str):
        return 0.0  # no answer tag: 0, as the release RL reward; a non-str label would crash the release
    return 1.0 if ground_truth.lower() in answer.lower() else 0.0


def official_format(response) -> float:
    """The release's format reward: after the tag-space clean-up, re.fullmatch(
    r"<think>.*?</think>\\s*<answer>.*?</answer>", DOTALL). Unlike format_reward it accepts nested or duplicated
    blocks ("<think>a</think><answer>b</answer><answer>c</answer>") and "< think >" spellings, and text must
    not stand before <think> or after the last </answer>. Decided in linear time: the fullmatch exists iff the
    text starts with <think>, ends with </answer>, and some </think> is followed by whitespace and an <answer>
    whose content may be empty but does not overlap the final </answer>."""
    text = RELEASE_TAG_SPACE_RE.sub("", as_str(response))
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return 0.0
    last = len(text) - len(ANSWER_CLOSE)  # where the final </answer> starts
    i = text.find(THINK_CLOSE, len(THINK_OPEN))
    while i != -1:
        j = i + len(THINK_CLOSE)
        while j < len(text) and text[j].isspace():
            j += 1
        if text.startswith(ANSWER_OPEN, j) and j + len(ANSWER_OPEN) <= last:
            return 1.0
        i = text.find(THINK_CLOSE, i + 1)
    return 0.0


ACCURACY_FNS = {"strict": strict_accuracy, "official": official_accuracy}
FORMAT_FNS = {"strict": format_reward, "official": official_format}
assert tuple(ACCURACY_FNS) == tuple(FORMAT_FNS) == REWARD_MODES


# -----------------------------------------------------------------------------
# Reward

def score(response, ground_truth, mode="strict", acc_weight=0.9, fmt_weight=0.1) -> dict:
    """R = acc_weight * accuracy + fmt_weight * format (release: 0.9 / 0.1). Never raises on content."""
    if mode not in REWARD_MODES:
        raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
    fmt = FORMAT_FNS[mode](response)
    acc = ACCURACY_FNS[mode](response, ground_truth)
    return {"overall": acc_weight * acc + fmt_weight * fmt, "format": fmt, "accuracy": acc}


def batch_score(responses, ground_truths, mode="strict", acc_weight=0.9, fmt_weight=0.1) -> dict:
    """score() over a batch: {"overall": [...], "format": [...], "accuracy": [...]}, one entry per rollout."""
    responses, ground_truths = list(responses), list(ground_truths)
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    out = {"overall": [], "format": [], "accuracy": []}
    for response, gt in zip(responses, ground_truths):
        s = score(response, gt, mode=mode, acc_weight=acc_weight, fmt_weight=fmt_weight)
        for key in out:
            out[key].append(s[key])
    return out


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Score one response with the Fine-R1 TAPO reward.")
    parser.add_argument("response", help="model output, e.g. '<think>...</think><answer>X</answer>'")
    parser.add_argument("ground_truth", help="class label, e.g. 'Laysan Albatross'")
    parser.add_argument("--mode", choices=REWARD_MODES, default="strict",
                        help="strict: exact class after normalisation; official: release substring check")
    parser.add_argument("--acc_weight", type=float, default=0.9, help="accuracy weight (release: 0.9)")
    parser.add_argument("--fmt_weight", type=float, default=0.1, help="format weight (release: 0.1)")
    args = parser.parse_args()
    result = score(args.response, args.ground_truth, args.mode, args.acc_weight, args.fmt_weight)
    print(json.dumps(result))
