"""Shared fixtures: the repo root on sys.path, a tiny preset policy, and a padded multimodal batch."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    from policy import load_policy
    return load_policy("tiny")


def random_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def padded_batch(processor, sizes=((112, 112), (140, 112), (112, 84)), responses=None, seeds=None):
    """Left-padded prompts with images of several sizes + right-padded responses of different lengths."""
    from data import encode_prompts, encode_responses, join_prompt_response
    seeds = list(range(len(sizes))) if seeds is None else seeds
    images = [random_image(w, h, s) for s, (w, h) in zip(seeds, sizes)]
    questions = ["What species of bird is this?", "Describe this image.", "What model of aircraft is shown here?"]
    questions = [questions[s % 3] for s in seeds]
    prompt = encode_prompts(processor, images, questions)
    default = ["<think> red head </think>\n\n<answer>Vesper Finch</answer>", "A bird.",
                              "<think> a plane with blue wings and a white tail </think> <answer>Kestrel</answer>"]
    responses = responses or [default[s % 3] for s in seeds]
    return join_prompt_response(prompt, encode_responses(processor.tokenizer, responses),
                                processor.tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small embedded world (2 domains x 4 classes, 2 shots) for end-to-end TAPO runs."""
    import world
    out = tmp_path_factory.mktemp("world")
    world.generate(out, classes_per_domain=4, shots=2, test_per_class=1, captions=1, knowledge_repeats=1,
                   domains=("bird", "flower"), workers=1)
    return out
