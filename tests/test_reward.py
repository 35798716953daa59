"""Reward on hand-written strings: format, extraction, normalisation, strict vs official accuracy, weights."""
import os
import random
import re
import subprocess
import sys
import time

import pytest

import reward
from reward import batch_score, format_reward, score, strict_answer, strict_label

GT = "Laysan Albatross"
OTHER = "Sooty Albatross"


def wrap(answer, think="white head, dark back"):
    return f"<think>{think}</think>\n\n<answer>{answer}</answer>"


# -----------------------------------------------------------------------------
# Totals and weights

def test_correct_with_format_scores_one():
    """A well-formed response naming the ground truth earns 0.9 + 0.1 = 1.0."""
    assert score(wrap(GT), GT) == {"overall": pytest.approx(1.0), "format": 1.0, "accuracy": 1.0}


def test_wrong_with_format_scores_format_weight():
    """A well-formed response naming another class earns only the format weight 0.1."""
    assert score(wrap(OTHER), GT) == {"overall": pytest.approx(0.1), "format": 1.0, "accuracy": 0.0}


def test_correct_without_format_scores_acc_weight():
    """A correct answer without the <think> block earns the accuracy weight 0.9 only."""
    assert score(f"<answer>{GT}</answer>", GT) == {"overall": pytest.approx(0.9), "format": 0.0, "accuracy": 1.0}


def test_custom_weights_hand_computed():
    """overall = acc_weight * accuracy + fmt_weight * format for arbitrary weights."""
    assert score(wrap(GT), GT, acc_weight=0.7, fmt_weight=0.3)["overall"] == pytest.approx(1.0)
    assert score(wrap(OTHER), GT, acc_weight=0.7, fmt_weight=0.3)["overall"] == pytest.approx(0.3)
    assert score(f"<answer>{GT}</answer>", GT, acc_weight=0.7, fmt_weight=0.3)["overall"] == pytest.approx(0.7)
    assert score(wrap(GT), GT, acc_weight=2.0, fmt_weight=0.5)["overall"] == pytest.approx(2.5)
    assert score("nothing", GT, acc_weight=2.0, fmt_weight=0.5)["overall"] == 0.0


def test_batch_score_matches_score():
    """batch_score returns one list per key whose entries equal score() on each pair."""
    responses = [wrap(GT), wrap(OTHER), f"<answer>{GT}</answer>", None]
    out = batch_score(responses, [GT] * 4)
    assert out["overall"] == pytest.approx([1.0, 0.1, 0.9, 0.0])
    assert out["format"] == [1.0, 1.0, 0.0, 0.0]
    assert out["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        batch_score(responses, [GT])


def test_unknown_mode_raises():
    """A mode outside REWARD_MODES is a caller bug and raises ValueError."""
    assert reward.REWARD_MODES == ("strict", "official")
    with pytest.raises(ValueError):
        score(wrap(GT), GT, mode="substring")


# -----------------------------------------------------------------------------
# Format

def test_format_whitespace_tolerance():
    """Whitespace at the ends and between </think> and <answer> is accepted; empty blocks are too."""
    assert format_reward(f"  \n{wrap(GT)}\n ") == 1.0
    assert format_reward(f"<think>x</think><answer>{GT}</answer>") == 1.0
    assert format_reward(f"<think>x</think> \t\n <answer>{GT}</answer>") == 1.0
    assert format_reward("<think></think><answer></answer>") == 1.0


@pytest.mark.parametrize("response", [
    f"<think>a</think><think>b</think><answer>{GT}</answer>",          # duplicate think
    f"<think>a</think><answer>{OTHER}</answer><answer>{GT}</answer>",  # duplicate answer
    f"<think>a</think><answer>{GT}</answer><think>b</think>",          # think after answer
])
def test_duplicate_tags_fail_format(response):
    """Each of the four tags must occur exactly once."""
    assert format_reward(response) == 0.0


def test_duplicate_answer_blocks_fail_strict_accuracy():
    """Several <answer> blocks are a hedge: strict accuracy 0 even if one of them is right."""
    response = f"<think>a</think><answer>{OTHER}</answer><answer>{GT}</answer>"
    assert score(response, GT)["accuracy"] == 0.0
    assert score(f"<answer>{GT}</answer><answer>{GT}</answer>", GT)["accuracy"] == 0.0


@pytest.mark.parametrize("response", [
    f"<answer>{GT}</answer>",                       # no think
    f"<think>a</think>{GT}",                        # no answer
    f"<think>a</think><answer>{GT}",                # unclosed answer
    f"<think>a<answer>{GT}</answer>",               # unclosed think
    f"a</think><answer>{GT}</answer>",              # no <think>
    f"<answer>{GT}</answer><think>a</think>",       # wrong order
    f"</think>a<think><answer>{GT}</answer>",       # close before open
    f"Sure! <think>a</think><answer>{GT}</answer>",  # text before
    f"<think>a</think><answer>{GT}</answer> Done.",  # text after
    f"<think>a</think> so <answer>{GT}</answer>",    # text between blocks
    f"< think >a</think><answer>{GT}</answer>",      # spaced tag (release strips these, we do not)
    f"<THINK>a</THINK><ANSWER>{GT}</ANSWER>",        # tags are case-sensitive
    "",
])
def test_missing_or_misplaced_tags_fail_format(response):
    """Anything but <think>..</think> WS <answer>..</answer> (stripped) has format 0."""
    assert format_reward(response) == 0.0


@pytest.mark.parametrize("response", [
    f"<think>a <think>b</think> c</think><answer>{GT}</answer>",
    f"<think>a</think><answer><answer>{GT}</answer></answer>",
    f"<think>a <answer>{OTHER}</answer></think><answer>{GT}</answer>",
    f"<think>a</think><answer>{GT}<think>b</think></answer>",
])
def test_nested_tags_fail_format(response):
    """A tag inside a block of its own or the other kind gives format 0."""
    assert format_reward(response) == 0.0


def test_nested_answer_fails_strict_accuracy():
    """An answer block nested inside the thinking is a second block: strict accuracy 0."""
    assert score(f"<think>a <answer>{OTHER}</answer></think><answer>{GT}</answer>", GT)["accuracy"] == 0.0


# -----------------------------------------------------------------------------
# Extraction and normalisation

def test_strict_answer():
    """strict_answer returns the stripped content of the last complete block, else None."""
    assert strict_answer(wrap(f"  {GT}\n")) == GT
    assert strict_answer(f"<answer>{OTHER}</answer> <answer>{GT}</answer>") == GT
    assert strict_answer(f"<answer>{OTHER}<answer>{GT}</answer>") == GT
    assert strict_answer("<answer></answer>") == ""
    assert strict_answer(f"<think>{GT}</think>") is None
    assert strict_answer(f"<answer>{GT}") is None
    assert strict_answer(f"</answer>{GT}<answer>") is None
    assert strict_answer(None) is None


@pytest.mark.parametrize("raw, expected", [
    ("black_footed albatross", "black footed albatross"),
    ("Black-Footed  Albatross.", "black footed albatross"),
    ("  BLACK\tfooted\nALBATROSS!  ", "black footed albatross"),
    ("Brewer's Sparrow", "brewers sparrow"),
    ("Boeing 737-200", "boeing 737 200"),
    ("F/A-18", "fa 18"),
    ("Ram C/V Cargo Van Minivan 2012", "ram cv cargo van minivan 2012"),
    ("Chihuahua \u2014 long\u2013haired", "chihuahua long haired"),
    ("Grand Basset Griffon Vendéen", "grand basset griffon vendéen"),
    ("", ""),
    (None, ""),
])
def test_strict_label(raw, expected):
    """strict_label lowers, turns _ and dashes into spaces, drops punctuation, collapses spaces."""
    assert strict_label(raw) == expected


@pytest.mark.parametrize("answer", [
    "black_footed albatross",
    "Black-Footed  Albatross.",
    "BLACK FOOTED ALBATROSS",
    "The Black Footed Albatross.",
    "a black-footed albatross",
    "\n Black footed albatross \n",
])
def test_strict_forgives_case_underscore_punctuation_spacing_article(answer):
    """Strict mode accepts the label up to normalisation and one leading article."""
    assert score(wrap(answer), "Black_footed_Albatross")["accuracy"] == 1.0


# -----------------------------------------------------------------------------
# Strict accuracy: listing, hedging, empty

def test_empty_answer_earns_no_accuracy():
    """An empty (or whitespace / punctuation only) answer earns accuracy 0 in both modes."""
    for answer in ["", "   ", "\n", "."]:
        for mode in reward.REWARD_MODES:
            assert score(wrap(answer), GT, mode=mode) == {"overall": pytest.approx(0.1), "format": 1.0, "accuracy": 0.0}


LISTS = [
    f"{GT}, {OTHER}",
    f"{OTHER}, {GT}",
    f"{GT}; {OTHER}",
    f"{GT}/{OTHER}",
    f"{GT} / {OTHER}",
    f"{GT} or {OTHER}",
    f"{GT} and {OTHER}",
    f"{GT}\n{OTHER}",
    f"1. {GT}\n2. {OTHER}",
    f"- {GT}\n- {OTHER}",
    f"either {GT} or {OTHER}",
    f"{GT} or maybe {OTHER}",
    f"{GT} (or possibly {OTHER})",
    f"probably {GT}",
    f"{GT} (Phoebastria immutabilis)",
    f"The bird is a {GT}",
    f"{GT} {GT}",
]


@pytest.mark.parametrize("answer", LISTS)
def test_strict_rejects_lists_and_hedges(answer):
    """Strict mode gives 0 to any answer that lists, hedges or adds words around the label."""
    assert score(wrap(answer), GT)["accuracy"] == 0.0


@pytest.mark.parametrize("answer", LISTS[:12])
def test_official_rewards_lists_containing_gt(answer):
    """Official (release) mode rewards a list that contains the label: the Δ10 exploit, kept for ablation."""
    assert score(wrap(answer), GT, mode="official")["accuracy"] == 1.0


def test_official_release_details():
    """Official mode: substring, case-insensitive, first answer block, no tag -> 0, tag spaces cleaned."""
    assert score(wrap(f"I think {GT.upper()}!"), GT, mode="official")["accuracy"] == 1.0
    assert score(wrap(OTHER), GT, mode="official")["accuracy"] == 0.0
    assert score(f"<think>{GT}</think> {GT}", GT, mode="official")["accuracy"] == 0.0  # no tag: 0 for RL
    assert score(f"<answer>{OTHER}</answer><answer>{GT}</answer>", GT, mode="official")["accuracy"] == 0.0
    assert score(f"< answer > {GT} </ answer >", GT, mode="official")["accuracy"] == 1.0
    assert score(wrap(GT), "", mode="official")["accuracy"] == 1.0  # the release: "" in answer
    assert score(wrap("Black_footed"), "black_footed", mode="official")["accuracy"] == 1.0


def release_accuracy(response, ground_truth):
    """Oracle: accuracy_reward of the release's TAPO/examples/reward_function/cls_thinking.py, as written."""
    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    match = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    if match is None:
        return 0.0
    return 1.0 if ground_truth.lower() in match.group(1).strip().lower() else 0.0


def test_official_matches_release_oracle():
    """Official accuracy equals the release's own regex code on hand-written and random tag soups."""
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "< answer >", "</ answer>", " ", "\n", "/",
              "<", ">", "Laysan", "Albatross", "laysan albatross", GT, OTHER, ", ", " or "]
    rng = random.Random(0)
    responses = [wrap(a) for a in LISTS] + [f"<answer>{a}</answer>" for a in LISTS]
    responses += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    for response in responses:
        assert reward.official_accuracy(response, GT) == release_accuracy(response, GT), repr(response)


def release_format(response):
    """Oracle: format_reward of the release's cls_thinking.py, as written (after its tag-space clean-up)."""
    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    return 1.0 if re.fullmatch(re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL), response) else 0.0


@pytest.mark.parametrize("response, expected", [
    (f"< think >x</ think ><answer>{GT}</answer>", 1.0),            # spaced tags are cleaned first
    (f"<think>a</think><answer>b</answer><answer>{GT}</answer>", 0.1),  # duplicated answer blocks: format 1
    (f"<think>a<think>b</think></think><answer>{GT}</answer>", 1.0),  # nested think
    (f"\n<think>a</think>\n\n<answer>{GT}</answer>\n", 1.0),       # whitespace at the ends, next to tags
    (f"x<think>a</think><answer>{GT}</answer>", 0.9),                # text before <think>: no format
    (f"<think>a</think><answer>{GT}</answer>.", 0.9),                # text after </answer>: no format
])
def test_official_reward_is_the_release_reward(response, expected):
    """--reward official gives the release's total reward (0.9 acc + 0.1 format) on hand-written strings."""
    assert score(response, GT, mode="official")["overall"] == pytest.approx(expected)
    assert score(response, GT, mode="official")["format"] == release_format(response)


def test_official_format_matches_release_oracle():
    """official_format equals the release's fullmatch on random tag soups (it runs in linear time instead)."""
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "< think >", "</ answer>", " ", "\n", "/", "a", GT]
    rng = random.Random(1)
    for _ in range(20000):
        response = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert reward.official_format(response) == release_format(response), repr(response)


def test_strict_format_rejects_duplicated_blocks():
    """Strict mode keeps counting tags: a duplicated answer block has no format reward."""
    assert score(f"<think>a</think><answer>b</answer><answer>{GT}</answer>", GT)["format"] == 0.0


# -----------------------------------------------------------------------------
# Robustness

@pytest.mark.parametrize("bad", [None, 0, 1.5, b"<answer>x</answer>", ["x"], {"a": 1}, object()])
def test_non_string_inputs_never_raise(bad):
    """Non-str response or ground truth is scored as the empty string: zeros, no exception."""
    for mode in reward.REWARD_MODES:
        assert score(bad, GT, mode=mode) == {"overall": 0.0, "format": 0.0, "accuracy": 0.0}
        assert score(wrap(GT), bad, mode=mode) == {"overall": pytest.approx(0.1), "format": 1.0, "accuracy": 0.0}


@pytest.mark.parametrize("response", [
    "<think>\u00e9\u6f22\u5b57 \U0001F426</think><answer>\u738b\u4f01\u9e45</answer>",
    "<think>\x00\x01\ud800</think><answer>x</answer>",
    "</answer></think><answer><think>" * 3,
    "<answer" * 5 + ">" * 5,
    "\u200b" * 10,
], ids=["cjk", "control", "shuffled", "partial", "zero_width"])
def test_odd_strings_never_raise(response):
    """Unicode, control characters, lone surrogates and unmatched tags score without raising."""
    for mode in reward.REWARD_MODES:
        out = score(response, GT, mode=mode)
        assert set(out) == {"overall", "format", "accuracy"}


def test_unicode_label_matches():
    """Non-ASCII labels match after normalisation."""
    assert score(wrap("Grand Basset Griffon Vendéen."), "grand_basset_griffon_vendéen")["overall"] == pytest.approx(1.0)


@pytest.mark.parametrize("response", [
    "<think>" * 30_000,
    "<answer>" * 25_000,
    "<think>" + "a" * 200_000,
    "<think>a</think><answer>" + "<" * 200_000,
    "<think>" + "</think> " * 25_000 + "<answer>x</answer>",
    "<answer>" + "x" * 100_000 + "</answer" * 13_000,
    " <" * 100_000,
    "/ " * 100_000,
], ids=["think", "answer", "unclosed", "lt", "close_think", "partial_close", "space_lt", "slash"])
def test_very_long_output_is_fast(response):
    """A ~200k-char pathological rollout scores in both modes in well under a second."""
    assert len(response) >= 200_000
    t0 = time.perf_counter()
    for mode in reward.REWARD_MODES:
        score(response, GT, mode=mode)
    assert time.perf_counter() - t0 < 0.5


def test_very_long_valid_output_is_scored():
    """A long but well-formed rollout is still scored correctly."""
    response = wrap(GT, think="feather " * 30_000)
    t0 = time.perf_counter()
    assert score(response, GT)["overall"] == pytest.approx(1.0)
    assert score(response, GT, mode="official")["overall"] == pytest.approx(1.0)
    assert time.perf_counter() - t0 < 0.5


def test_cli_prints_score():
    """`python reward.py RESPONSE GT` prints the score dict as JSON."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reward.py")
    out = subprocess.run([sys.executable, script, wrap(GT), GT], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '{"overall": 1.0, "format": 1.0, "accuracy": 1.0}'
