"""The embedded benchmark: a synthetic fine-grained visual recognition world, written in the release's formats.

No weights or datasets can be downloaded here, so the project ships its own small FGVR world in which the
paper's setting (README "Release facts") holds in miniature and the whole pipeline runs on a CPU:

    python world.py --out out/world                 # the default world, a few seconds
    python world.py --out out/world --preview       # also a contact sheet per domain (preview_DOMAIN.png)
    python world.py --help                          # every size is a flag

The world
---------
Three domains (bird, flower, aircraft), each with 16 invented sub-categories ("Tessel Wren", "Dusk Lily",
"Marlow Comet"). A class is a combination of four visual attributes: the colours of three LARGE parts (bird:
head / wings / body; flower: petals / centre / leaves; aircraft: fuselage / wings / tail) and one coarse
pattern (wings or petals plain or "tipped": their outer half black, or white on black parts). Classes come in
genera of about four, like real taxonomy: a base combination plus variants that each change ONE attribute, so
every class has a neighbour one attribute away and the hard negatives are its congeners (low inter-class
variance), while genera differ in most attributes. Each image varies in pose, flip, scale, position,
background colour, clutter, colour jitter, noise and a small occluder (high intra-class variance).
The distinctions are cues that a 0.7M-parameter Qwen2.5-VL trained from scratch can learn in minutes on two
cores (colours of large parts, patterns spanning several 14-px patches); thin or small cues (beaks, fine
stripes) were measured to stay at chance for that model, and flat backgrounds made colours about 3x faster,
so the variance is put where it does not drown the cues: backgrounds are muted and low-contrast, jitter never
changes a colour's name, the occluder is at most 14 px. The palettes are one table (COLOURS, PATTERNS,
DOMAINS) at the top of the file.

The paper analogy
-----------------
Class names say nothing about attributes, so naming a class needs *knowledge*, as naming a real species does.
That knowledge lives in a pretraining corpus (`pretrain.json`, Stage-1 format, trained into the base model by
`sft.py`), which makes the base model play Qwen2.5-VL-Instruct. For EVERY class, seen and unseen: encyclopaedic
texts in both directions and field-guide quizzes under the later stages' prompts (text only), enough of them
that the base model recalls every class from its description; its own pretraining images (a pool disjoint from
the 4-shot and test images), a share `name_frac` of them named the web's way
(`web_name`: a share names a look-alike, the genus or the super-category); and one instruction sample per
image under the RL / open / closed prompts in <think>..</think><answer>..</answer> form (attribute questions
that name no class, and a share `instruct_name_frac` of class questions answered with the noisy web name,
under the closed-world prompt always one of the options; a 0.7M model did not bridge attribute-only
instruction tuning to class questions). Only a share
`pattern_frac` of the texts about an image mention its pattern, a perception weakness shared by all classes.
Like the paper (section 4),
a seeded 60% of each domain's classes are seen and 40% unseen; CoT SFT gets one rationale per seen class,
TAPO a 4-shot triplet set of seen classes, and eval covers seen and unseen classes. No unseen class name or
unseen-class image reaches `cot_sft.json`, `sft_nocot.json` or `rl_train.jsonl`; option lists of the eval
files draw distractors from all classes, like the release's. The two replay files are the base model's own
corpus, re-used against forgetting (README Δ): `replay.json` a part of it as is, `analysis_replay.json` its
pretraining images (every class's, as in the corpus) with what the corpus said of them, put as the start of a
rationale; it names no unseen class.

Files (all paths inside them relative to the world folder, which is the image root)
---------------------------------------------------------------------------------
    world.json                 metadata: seed, sizes, palette, per domain the attributes, classes, split
    pretrain.json              base-model corpus (Stage-1 JSON): knowledge texts, captions, attribute VQA
    replay.json                the part of pretrain.json that SFT replays: all but the short prompt-format answers
    analysis_replay.json       what CoT SFT also replays: each pretraining image under a stage prompt, answered with
                               only the rationale's visual analysis in the corpus's words (Stage-1 + "prefix": no
                               end of turn; "unscored": the pattern word where no text about the image stated it)
    cot_sft.json               Stage-1 CoT SFT: one image per seen class asked under the RL / open / closed prompts
                               (+ closed_option_sets - 1 more closed questions), release system prompt + rationale
    sft_nocot.json             same images/questions, assistant = "<answer>LABEL</answer>" ("SFT w/o CoT")
    rl_train.jsonl             Stage-2 TAPO rows: images, problem, answer, image_noisy (pos), image_aug (neg)
    {domain}_{seen,unseen}.jsonl  eval: image_path, question, options (gt first, as released), ground_truth
    images/{train,test}/DOMAIN/CLASS_SLUG/N.png, images/pretrain/DOMAIN/N.png   (112x112 RGB)

Rationales follow the paper's four parts, short enough for a tiny model to write token by token:
    <think> Visual analysis: the bird has a red head, plain blue wings and a yellow body. Candidates: A, B,
    Vesper Finch, C. Comparison: A has a red head, plain green wings and a yellow body; B has ...; Vesper Finch
    has a red head, plain blue wings and a yellow body; C has ... Prediction: Vesper Finch. </think>\\n\\n<answer>
    Vesper Finch</answer>
The comparison recalls each candidate's description from the base model's knowledge (`--comparison describe`,
default; `difference` lists only what differs, "A has green wings; ...; Vesper Finch matches"). Candidates are
the true class and its 3 nearest seen classes by attribute (Hamming) distance, in a seeded order; under the
closed-world prompt they are the options as listed, and `--closed-option-sets 6` (default) asks each seen
class's image five more times under the closed prompt, with other random seen classes as options. The base
model already reasons this way in words, about a description and for every class: `--quiz-cot 1` (default)
answers the text-only field-guide quizzes with the same four-part rationale (the visual analysis being the
described attributes; closed-world candidates = the options). What CoT SFT adds is doing it from an image.
The triplet negative is an image of the nearest other seen class; the closed-world options are the
ground truth and the 3 nearest classes of the whole domain (ties broken at random per line).
`--extra-per-domain K` (default 0) turns K seen classes of each domain into "extra" classes: the corpus is the
same (byte for byte), but they get no training or test image and are never an answer; the SFT rationales may
list them among the candidates and options. They stand for what a real base model knows beyond a benchmark:
the release's rationales name such classes among their candidates, while here, without them, every candidate
of every fine-tuning rationale is a seen class, and a policy learns that candidates are seen classes.

Deviations / choices
--------------------
1. Everything is deterministic per seed (byte-identical files). The class table of a domain (attributes and
   names) does not depend on the seed: only the split, the images and the texts' order do.
2. `cot_sft.json` / `sft_nocot.json` carry the release's R1 system prompt (format fidelity); the stages decide
   whether to use it (data.py: default none everywhere, README Δ14).
3. The CoT image of a seen class is its first 4-shot training image.
"""
import argparse
import hashlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import SYSTEM_PROMPT_R1, closed_prompt, open_prompt, rl_prompt

VERSION = 1
SIZE = 112          # image side: 8x8 patches of 14 px -> 16 tokens after Qwen2.5-VL's 2x2 merge
SUPERSAMPLE = 2     # shapes are drawn at 2x and downsampled (smooth edges, same colours)

# ----------------------------------------------------------------------------------------------------------
# Attribute palettes: edit here to change what the world's distinctions are made of.

COLOURS = {  # well separated, one short word each
    "red": (210, 35, 35), "blue": (35, 75, 215), "yellow": (240, 210, 30), "green": (35, 155, 55),
    "white": (245, 245, 240), "black": (25, 25, 25), "orange": (245, 135, 20), "purple": (140, 45, 180),
}
PALETTE = tuple(COLOURS)
PATTERNS = ("plain", "tipped")  # tipped: the outer half of the part in a contrast colour (several patches wide)
JITTER = 14           # +- per channel per part: never changes which colour name a part reads as
NOISE_SIGMA = 3.0     # light gaussian pixel noise ...
NOISE_P = 0.5         # ... on half of the images (noise also makes PNGs ~8x larger and slower to write)
OCCLUDE_P = 0.3       # probability of one small occluder (at most ~14 px square)
SCALE = (0.85, 1.12)  # object scale range
ANGLE = 12.0          # +- degrees of in-plane rotation (pose)


@dataclass(frozen=True)
class Domain:
    name: str               # file prefix and super-category word
    noun: str               # "bird"; with article in `article`
    article: str
    kind: str               # "species" / "model": RL question "what {kind} of {noun} is shown?"
    attributes: tuple       # ((attr, values), ...) in description order
    template: str           # the description of a class from its attributes (captions, knowledge, CoT)
    phrases: dict           # attr -> template for "{v}" used in comparisons ("a {v} head")
    vqa: dict               # attr -> attribute question
    first_words: tuple      # invented name parts (never attribute words)
    second_words: tuple     # genus words: classes of one genus look alike

    @property
    def rl_question(self):
        """The RL rows' class question (the release's problem wording)."""
        return f"Based on this image, what {self.kind} of {self.noun} is shown?"

    @property
    def plural(self):
        return self.noun if self.noun == "aircraft" else self.noun + "s"

    def describe(self, a):
        """Noun phrase listing a class's attributes, e.g. 'a red head, plain blue wings and a yellow body'."""
        return self.template.format(**a)


DOMAINS = {
    "bird": Domain(
        "bird", "bird", "a", "species",
        (("head", PALETTE), ("wings", PALETTE), ("body", PALETTE), ("pattern", PATTERNS)),
        "a {head} head, {pattern} {wings} wings and a {body} body",
        {"head": "a {} head", "wings": "{} wings", "body": "a {} body", "pattern": "{} wings"},
        {"head": "What colour is the head?", "wings": "What colour are the wings?",
         "body": "What colour is the body?", "pattern": "Are the wings plain or tipped?"},
        ("Vesper", "Halden", "Marrow", "Tessel", "Corvel", "Mirren", "Pellam", "Oswin", "Bexley", "Calder",
         "Fennick", "Garrow", "Hollin", "Kestle", "Lanner", "Dunmore"),
        ("Finch", "Warbler", "Shrike", "Wren", "Tanager", "Plover")),
    "flower": Domain(
        "flower", "flower", "a", "species",
        (("petals", PALETTE), ("centre", PALETTE), ("leaves", PALETTE), ("pattern", PATTERNS)),
        "{pattern} {petals} petals, a {centre} centre and {leaves} leaves",
        {"petals": "{} petals", "centre": "a {} centre", "leaves": "{} leaves", "pattern": "{} petals"},
        {"petals": "What colour are the petals?", "centre": "What colour is the centre?",
         "leaves": "What colour are the leaves?", "pattern": "Are the petals plain or tipped?"},
        ("Dusk", "Ember", "Morrow", "Saffel", "Quill", "Brenna", "Orla", "Yarrow", "Linden", "Tamsin",
         "Wick", "Elsin", "Farrow", "Ilsa", "Nettle", "Rowan"),
        ("Lily", "Aster", "Poppy", "Orchid", "Daisy", "Mallow")),
    "aircraft": Domain(
        "aircraft", "aircraft", "an", "model",
        (("fuselage", PALETTE), ("wings", PALETTE), ("tail", PALETTE), ("pattern", PATTERNS)),
        "a {fuselage} fuselage, {pattern} {wings} wings and a {tail} tail",
        {"fuselage": "a {} fuselage", "wings": "{} wings", "tail": "a {} tail", "pattern": "{} wings"},
        {"fuselage": "What colour is the fuselage?", "wings": "What colour are the wings?",
         "tail": "What colour is the tail?", "pattern": "Are the wings plain or tipped?"},
        ("Strom", "Halvard", "Tessaro", "Valen", "Orrin", "Brisco", "Aveline", "Kettering", "Marlow",
         "Solberg", "Dray", "Caspian", "Nordell", "Pryor", "Wexford", "Ashby"),
        ("Comet", "Ranger", "Vector", "Nomad", "Cirrus", "Talon")),
}
# the coloured parts of each domain (all their values are colour names); the drawing functions use these names
COLOUR_PARTS = {d: tuple(a for a, v in dom.attributes if set(v) <= set(COLOURS)) for d, dom in DOMAINS.items()}

EVAL_QUESTIONS = (  # the release's eval question styles (tests/fixtures/eval_*.sample.jsonl)
    "What kind of {noun} is this?", "What type of {noun} is shown in the image?",
    "What is the {noun} shown in the photo?", "Do you know what {noun} this is?",
    "What is the name of the {noun} in the photo?", "What is the {noun} featured in this picture?")
CAPTION_QUESTIONS = ("Describe this image.", "What does this image show?", "Describe the {noun} in the picture.")


# ----------------------------------------------------------------------------------------------------------
# Classes: attribute combinations + invented names (fixed per domain, independent of the world seed)

@dataclass(frozen=True)
class WorldClass:
    domain: str
    name: str
    attrs: tuple  # ((attr, value), ...) in the domain's order

    @property
    def a(self):
        return dict(self.attrs)

    @property
    def slug(self):
        return self.name.lower().replace(" ", "_")


def distance(c1, c2):
    """Attribute (Hamming) distance between two classes: the number of attributes that differ."""
    return sum(v1 != v2 for (_, v1), (_, v2) in zip(c1.attrs, c2.attrs))


def make_classes(domain, n=16):
    """The `n` classes of a domain, fixed per (domain, n), independent of the world seed.

    Classes come in "genera" of about 4, like real taxonomy: a base combination and mutants that each change
    ONE attribute of it (so every class has a neighbour one attribute away, and same-genus classes are at
    most two apart), while the bases are far from each other. Values are picked least-used-first so every
    colour appears on every part about equally often; the colour parts of one class are all different.
    Names are an invented first word + the genus word ("Vesper Finch"); they never contain attribute words.
    """
    dom = DOMAINS[domain]
    rng = random.Random(f"classes/{domain}")
    attrs = [k for k, _ in dom.attributes]
    values = dict(dom.attributes)
    used = {k: {v: 0 for v in values[k]} for k in attrs}
    combos = []

    def valid(a):
        cols = [a[p] for p in COLOUR_PARTS[domain]]
        return len(set(cols)) == len(cols) and a not in combos

    def add(a):
        combos.append(a)
        for k in attrs:
            used[k][a[k]] += 1

    n_genera = max(1, n // 4)
    sizes = [n // n_genera + (g < n % n_genera) for g in range(n_genera)]
    genus_of, bases = [], []
    for g, size in enumerate(sizes):
        # base: far from the other bases, then made of the least-used values
        cands = []
        while len(cands) < 200:
            a = {k: rng.choice(values[k]) for k in attrs}
            if valid(a):
                cands.append(a)

        def base_key(a):
            dmin = min((sum(a[k] != b[k] for k in attrs) for b in bases), default=len(attrs))
            return (-dmin, sum(used[k][a[k]] for k in attrs), rng.random())
        base = min(cands, key=base_key)
        add(base)
        bases.append(base)
        genus_of.append(g)
        order = attrs[:]
        rng.shuffle(order)
        for m in range(size - 1):  # mutants: one attribute each, cycling through the attributes
            for j in range(len(attrs)):
                k = order[(m + j) % len(attrs)]
                opts = [dict(base, **{k: v}) for v in values[k] if v != base[k]]
                opts = [a for a in opts if valid(a)]
                if opts:
                    add(min(opts, key=lambda a: (used[k][a[k]], rng.random())))
                    genus_of.append(g)
                    break
            else:
                raise ValueError(f"{domain}: cannot build {n} classes from the palette")
    firsts, seconds = list(dom.first_words), list(dom.second_words)
    rng.shuffle(firsts)
    rng.shuffle(seconds)
    names = []
    for i, g in enumerate(genus_of):
        j = i
        while f"{firsts[j % len(firsts)]} {seconds[g % len(seconds)]}" in names:
            j += 1
        names.append(f"{firsts[j % len(firsts)]} {seconds[g % len(seconds)]}")
    return [WorldClass(domain, nm, tuple((k, c[k]) for k in attrs)) for nm, c in zip(names, combos)]


def nearest(c, pool, k, rng=None):
    """The k classes of `pool` (excluding c) closest to c; ties broken by `rng` (else by name)."""
    others = [o for o in pool if o.name != c.name]
    keys = {o.name: (rng.random() if rng else o.name) for o in others}
    return sorted(others, key=lambda o: (distance(c, o), keys[o.name]))[:k]


def extra_classes(seen, k, seed):
    """`k` of a domain's seen classes, seeded, made "extra": known to the base model (the whole corpus is about
    every class) and named in the fine-tuning files as a candidate or option, never as an answer; no training or
    test image. They stand for the many classes a real base model knows outside a benchmark, which the release's
    rationales name among their candidates (README, "The embedded world")."""
    if not k:
        return []
    assert k <= len(seen) - 2, f"{k} extra classes leave fewer than 2 of {len(seen)} seen classes"
    order = list(seen)
    seeded(seed, "extra", seen[0].domain).shuffle(order)
    return sorted(order[:k], key=seen.index)


def split_classes(classes, seed, seen_frac=0.6):
    """Seeded random split of one domain's classes into (seen, unseen), in the paper's 60/40 proportion."""
    rng = random.Random(f"{seed}/split/{classes[0].domain}")
    order = list(classes)
    rng.shuffle(order)
    n_seen = round(seen_frac * len(order))
    seen = sorted(order[:n_seen], key=classes.index)
    unseen = sorted(order[n_seen:], key=classes.index)
    return seen, unseen


# ----------------------------------------------------------------------------------------------------------
# Texts: descriptions, knowledge, captions, rationales

def articles(text):
    """'a orange head' -> 'an orange head' (the only vowel-initial palette words)."""
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)


def description(c, pattern=True):
    """The class's attributes in words; pattern=False leaves the pattern word out (a caption that omits it)."""
    dom = DOMAINS[c.domain]
    return articles(dom.describe(c.a) if pattern else dom.template.replace("{pattern} ", "").format(**c.a))


def difference(c, other):
    """What `other` has that differs from c, e.g. 'green wings and a black body'."""
    dom = DOMAINS[c.domain]
    diffs = [articles(dom.phrases[k].format(v)) for (k, v), (_, v0) in zip(other.attrs, c.attrs) if v != v0]
    return " and ".join(diffs)


def reasoning(c, candidates, comparison="difference"):
    """The text half of the CoT: candidates, comparison, prediction (shared by rationales and knowledge).
    comparison "difference": each other candidate's differing attributes ("A has green wings"), the class
    "matches"; "describe": every candidate's whole description, recalled from knowledge ("A has a red head,
    plain green wings and a yellow body"), the prediction is the one equal to the visual analysis."""
    if comparison == "describe":
        comp = [f"{o.name} has {description(o)}" for o in candidates]
    else:
        comp = [f"{o.name} matches" if o.name == c.name else f"{o.name} has {difference(c, o)}" for o in candidates]
    return (f"Candidates: {', '.join(o.name for o in candidates)}. "
            f"Comparison: {'; '.join(comp)}. Prediction: {c.name}.")


def rationale(c, candidates, comparison="difference"):
    """The paper's four-part CoT (visual analysis, <=4 candidates, comparison, prediction) in the release's
    target form `<think> ... </think>\\n\\n<answer>LABEL</answer>`."""
    dom = DOMAINS[c.domain]
    think = f"Visual analysis: the {dom.noun} has {description(c)}. " + reasoning(c, candidates, comparison)
    return f"<think> {think} </think>\n\n<answer>{c.name}</answer>"


def knowledge(c, classes, rng=None, comparison="difference"):
    """Encyclopaedic (question, answer) pairs about class c, both directions (against the reversal curse).
    With rng, the field-guide candidates are shuffled (as in a CoT rationale); without, c comes first."""
    dom, desc = DOMAINS[c.domain], description(c)
    looks = nearest(c, classes, 3)
    guide = [c] + looks
    if rng is not None:
        rng.shuffle(guide)
    look_names = ", ".join(f"the {o.name}" for o in looks[:-1]) + f" and the {looks[-1].name}"
    return [
        (f"Describe the {c.name}.", f"The {c.name} is {dom.article} {dom.noun} with {desc}."),
        (f"What does the {c.name} look like?", f"The {c.name} has {desc}."),
        (f"Tell me about the {c.name}.", f"The {c.name} is {dom.article} {dom.noun}. It has {desc}."),
        (f"Which {dom.noun} has {desc}?", f"The {c.name}."),
        (f"Name the {dom.noun} with {desc}.", f"It is the {c.name}."),
        (f"{dom.article.capitalize()} {dom.noun} with {desc} is called what?", f"The {c.name}."),
        (f"Which {dom.plural} look like the {c.name}?", f"{look_names[0].upper()}{look_names[1:]} look like the "
                                                        f"{c.name}."),
        # field-guide reasoning in words (no image): which species fit a description and how they differ. This is
        # the knowledge a CoT rationale draws on after its visual analysis (the text half of `rationale`).
        (f"{dom.article.capitalize()} {dom.noun} has {desc}. Which {dom.noun} is it?", reasoning(c, guide, comparison)),
    ]


def caption(c, pattern=True):
    dom = DOMAINS[c.domain]
    return f"{dom.article.capitalize()} {dom.noun} with {description(c, pattern)}."


def web_name(c, classes, rng, noise):
    """The name a web caption gives an image of class c, with the web's imperfections: a share of captions
    name a look-alike (the nearest class: a congener), only the genus ("a wren"), or only the super-category.
    noise = (congener, genus, super) probabilities; the rest name the class."""
    dom = DOMAINS[c.domain]
    r, (p_con, p_gen, p_sup) = rng.random(), noise
    if r < p_con:
        return f"the {nearest(c, classes, 1, rng)[0].name}"
    if r < p_con + p_gen:
        genus = c.name.split()[1]
        return f"{'an' if genus[0] in 'AEIOU' else 'a'} {genus.lower()}"
    if r < p_con + p_gen + p_sup:
        return f"{dom.article} {dom.noun}"
    return f"the {c.name}"


def named_caption(c, classes, rng, noise, pattern=True):
    """(question, answer) of a web-like sample that names the image's class (or what `web_name` makes of it):
    a caption ("This is the Tessel Wren, a bird with ...") or a plain question ("What kind of bird is this?")."""
    dom = DOMAINS[c.domain]
    name = web_name(c, classes, rng, noise)
    if rng.random() < 0.5:
        return (rng.choice(CAPTION_QUESTIONS).format(noun=dom.noun),
                f"This is {name}, {dom.article} {dom.noun} with {description(c, pattern)}.")
    return rng.choice(EVAL_QUESTIONS).format(noun=dom.noun), f"It is {name}."


def analysis(c, pattern=True):
    """The think of an instruction-following sample: what the image shows, in words."""
    return f"The {DOMAINS[c.domain].noun} has {description(c, pattern)}."


def instruct(c, rng, pattern=True, classes=None, noise=None):
    """A question about an image of c under one of the RL / open-world / closed-world prompts, answered in
    <think>..</think><answer>..</answer> form (an Instruct model's instruction tuning). Without `classes`: an
    attribute question (names no class). With `classes`: the class question, answered with the web's noisy name
    (`web_name`: a look-alike, the genus or the super-category in a share `noise`), closed-world options = the
    class and its 3 nearest classes."""
    dom = DOMAINS[c.domain]
    kind = rng.choice(("rl", "open", "closed"))
    if classes is None:
        attr = rng.choice(COLOUR_PARTS[c.domain])
        value = c.a[attr]
        q = dom.vqa[attr].rstrip("?")
        rl_q, q = f"Based on this image, {q[0].lower()}{q[1:]} of the {dom.noun}?", f"{q} of the {dom.noun}?"
        opts = [value] + rng.sample([v for v in COLOURS if v != value], 3)
    else:
        value = web_name(c, classes, rng, noise)
        value = value[4:] if value.startswith("the ") else value
        rl_q, q = dom.rl_question, rng.choice(EVAL_QUESTIONS).format(noun=dom.noun)
        opts = [c.name] + [o.name for o in nearest(c, classes, 3, rng)]
        if kind == "closed" and value not in opts:  # an Instruct model answers with one of the options: the
            value = c.name                           # web's genus / super-category names apply to open prompts only
    if kind == "rl":
        prompt = rl_prompt("<image> " + rl_q)  # as the RL rows' problem: the text keeps the space after <image>
    elif kind == "open":
        prompt = open_prompt(q)
    else:
        rng.shuffle(opts)
        prompt = closed_prompt(q, opts)
    return prompt, f"<think> {analysis(c, pattern)} </think>\n\n<answer>{value}</answer>"


def quiz(c, classes, rng, reasoned=False, comparison="difference"):
    """A field-guide question in words (no image) under one of the later stages' prompts: the description of
    class c -> its name, e.g. "Given the question: A bird has ... What kind of bird is it?, based on the options
    provided in [...]"
    -> "<think> The bird has ... </think>\\n\\n<answer>Tessel Wren</answer>". Knowledge in the Instruct format.
    reasoned=True: the think is the whole four-part text rationale (`rationale`), its candidates the options as
    listed under the closed prompt (a copy) and c with its 3 nearest classes otherwise: an Instruct model
    reasons about a description in words, for every class; what it lacks is doing so from an image."""
    dom = DOMAINS[c.domain]
    seen_as = f"{dom.article.capitalize()} {dom.noun} has {description(c)}."
    kind = rng.choice(("rl", "open", "closed"))
    q = f"{seen_as} " + (f"What {dom.kind} of {dom.noun} is it?" if kind == "rl" else
                         rng.choice(EVAL_QUESTIONS).format(noun=dom.noun).replace(" this", " it"))
    if kind == "rl":
        prompt = rl_prompt(q)
    elif kind == "open":
        prompt = open_prompt(q)
    else:
        opts = [c.name] + [o.name for o in nearest(c, classes, 3, rng)]
        rng.shuffle(opts)
        prompt = closed_prompt(q, opts)
    if reasoned:
        by_name = {o.name: o for o in classes}
        cands = [by_name[o] for o in opts] if kind == "closed" else [c] + nearest(c, classes, 3, rng)
        if kind != "closed":
            rng.shuffle(cands)
        return prompt, rationale(c, cands, comparison)
    return prompt, f"<think> {analysis(c)} </think>\n\n<answer>{c.name}</answer>"


def analysis_samples(pool, seen, rng):
    """The analysis replay (Stage-1 records, `prefix`: scored without an end of turn): for each pretraining image
    (image, class, pattern stated), the class question under the RL, open- or closed-world prompt, answered with
    the beginning of a rationale, "<think> Visual analysis: the bird has a red head, plain blue wings and a yellow
    body." The words are what the corpus said of the image; where no text about it stated its pattern, the
    pattern word is there (the rationale's form) but `unscored`. Closed-world options are seen classes only (the
    image's own among them when it is seen), so the file names no unseen class."""
    out = []
    for rel, c, stated in pool:
        dom = DOMAINS[c.domain]
        kind, q = rng.choice(("rl", "open", "closed")), rng.choice(EVAL_QUESTIONS).format(noun=dom.noun)
        if kind == "rl":
            prompt = rl_prompt(f"<image> {dom.rl_question}")
        elif kind == "open":
            prompt = open_prompt(q)
        else:
            pool_names = [o.name for o in seen if o.name != c.name]
            others = rng.sample(pool_names, min(4, len(pool_names)))  # a tiny world may have fewer seen classes
            opts = ([c.name] + others[:3]) if c in seen else others
            rng.shuffle(opts)
            prompt = closed_prompt(q, opts)
        head = f"<think> Visual analysis: the {dom.noun} has "
        text = head + description(c) + "."
        rec = {"messages": [{"role": "user", "content": "<image>" + prompt},
                            {"role": "assistant", "content": text}], "images": [rel], "prefix": True}
        if not stated:
            word = c.a["pattern"]
            start = text.index(f" {word} ", len(head) - 1) + 1
            rec["unscored"] = [[start, start + len(word)]]
        out.append(rec)
    return out


def tokenizer_corpus():
    """Fixed text (independent of any seed) covering the world's vocabulary, for policy.py's BPE tokenizer."""
    texts = list(COLOURS) + list(PATTERNS)
    for d, dom in DOMAINS.items():
        classes = make_classes(d, 16)
        texts += [q.format(noun=dom.noun) for q in EVAL_QUESTIONS + CAPTION_QUESTIONS]
        texts.append(dom.rl_question)
        texts += list(dom.vqa.values())
        for c in classes:
            texts += [caption(c), caption(c, False), analysis(c), analysis(c, False),
                      f"This is the {c.name}, {dom.article} {dom.noun} with {description(c)}. It is the {c.name}.",
                      f"This is a {c.name.split()[1].lower()}, It is an {dom.noun}."]
            texts += [instruct(c, seeded("tok", c.name, i))[1] for i in range(2)]
            texts += [f"{q} {a}" for q, a in knowledge(c, classes)]
            texts.append(rationale(c, [c] + nearest(c, classes, 3)))
    return texts


# ----------------------------------------------------------------------------------------------------------
# Drawing: shapes in object coordinates (origin at the object's centre, facing right, 1 unit = 1 px at scale 1)

def ellipse(cx, cy, rx, ry, rot=0.0, t0=0.0, t1=360.0, n=28, centre_pt=False):
    """Polygon of an (arc of an) ellipse rotated by `rot` degrees; `centre_pt` closes an arc through the centre."""
    r = math.radians(rot)
    pts = []
    for i in range(n + 1):
        t = math.radians(t0 + (t1 - t0) * i / n)
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + x * math.cos(r) - y * math.sin(r), cy + x * math.sin(r) + y * math.cos(r)))
    if centre_pt:
        pts.append((cx, cy))
    return pts


def contrast(colour_name):
    return "white" if colour_name == "black" else "black"


def bird_shapes(a, rng):
    """(polygon or line, colour name or rgb) back to front."""
    tip = a["pattern"] == "tipped"
    wing_rot = rng.uniform(-18, -4)
    s = [
        (("line", [(-4, 16), (-8, 34)], 3), (70, 60, 50)),                 # legs (not an attribute)
        (("line", [(6, 16), (5, 34)], 3), (70, 60, 50)),
        ([(-24, -2), (-46, -14), (-46, 10)], a["body"]),                  # tail, body colour
        (ellipse(0, 4, 30, 18), a["body"]),
        (ellipse(26, -15, 14, 14), a["head"]),
        ([(38, -19), (50, -14), (38, -10)], (80, 75, 70)),                 # beak (not an attribute)
        (ellipse(31, -18, 2.6, 2.6), (20, 20, 20)),                        # eye
        (ellipse(-6, 0, 23, 12, wing_rot), a["wings"]),
    ]
    if tip:  # the rear half of the wing, toward the tail
        s.append((ellipse(-6, 0, 23, 12, wing_rot, 90, 270, centre_pt=True), contrast(a["wings"])))
    return s, 0.9


def flower_shapes(a, rng):
    tip = a["pattern"] == "tipped"
    n_pet = rng.choice([5, 6, 7])
    phase = rng.uniform(0, 360)
    s = [(("line", [(0, 0), (rng.uniform(-6, 6), 72)], 5), (40, 95, 45)),      # stem (not an attribute)
         (ellipse(-15, 44, 16, 7.5, 30 + rng.uniform(-10, 10)), a["leaves"]),
         (ellipse(15, 56, 16, 7.5, -30 + rng.uniform(-10, 10)), a["leaves"])]
    for k in range(n_pet):
        ang = phase + k * 360 / n_pet
        cx, cy = 21 * math.cos(math.radians(ang)), 21 * math.sin(math.radians(ang))
        s.append((ellipse(cx, cy, 16, 9.5, ang), a["petals"]))
    if tip:  # outer half of every petal
        for k in range(n_pet):
            ang = phase + k * 360 / n_pet
            cx, cy = 21 * math.cos(math.radians(ang)), 21 * math.sin(math.radians(ang))
            s.append((ellipse(cx, cy, 16, 9.5, ang, -90, 90, centre_pt=True), contrast(a["petals"])))
    s.append((ellipse(0, 0, 13, 13), a["centre"]))
    return s, 0.85


def aircraft_shapes(a, rng):
    tip = a["pattern"] == "tipped"
    s = []
    for sign in (-1, 1):  # wings and tail planes, seen from above, nose to the right
        s.append(([(12, 4 * sign), (-6, 4 * sign), (-22, 46 * sign), (-8, 46 * sign)], a["wings"]))
        s.append(([(-26, 3 * sign), (-41, 3 * sign), (-50, 27 * sign), (-37, 27 * sign)], a["tail"]))
        if tip:  # outer half of each wing
            s.append(([(-2, 25 * sign), (-15, 25 * sign), (-22, 46 * sign), (-8, 46 * sign)],
                      contrast(a["wings"])))
    s.append((ellipse(0, 0, 46, 9), a["fuselage"]))
    s.append((ellipse(34, 0, 5, 3.5), (40, 50, 60)))                       # cockpit (not an attribute)
    return s, 0.95


DRAW = {"bird": bird_shapes, "flower": flower_shapes, "aircraft": aircraft_shapes}


def seeded(*key):
    """A `random.Random` seeded from a string key (stable across runs and Python versions)."""
    return random.Random("/".join(map(str, key)))


def render(c, key):
    """One 112x112 RGB image of class c; all variation is drawn from `key` (deterministic)."""
    rng = seeded("img", key)
    nrng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"noise/{key}".encode()).digest()[:8], "little"))
    S = SIZE * SUPERSAMPLE
    # muted, low-contrast background: low saturation, mid value (far from every palette colour)
    hue, sat, val = rng.random(), rng.uniform(0.05, 0.2), rng.uniform(0.45, 0.68)
    bg = hsv(hue, sat, val)
    img = Image.new("RGB", (S, S), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 4)):  # background clutter: small blobs a little lighter/darker than bg
        d = rng.uniform(-22, 22)
        col = tuple(int(min(255, max(0, ch + d))) for ch in bg)
        x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(4, 12) * SUPERSAMPLE
        draw.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=col)

    shapes, base = DRAW[c.domain](c.a, rng)
    flip = rng.random() < 0.5
    rot = math.radians(rng.uniform(-ANGLE, ANGLE))
    sc = base * rng.uniform(*SCALE) * SUPERSAMPLE
    jit = {n: tuple(int(min(255, max(0, ch + rng.uniform(-JITTER, JITTER)))) for ch in rgb)
           for n, rgb in COLOURS.items()}

    def tf(p):
        x, y = (-p[0] if flip else p[0]), p[1]
        return (sc * (x * math.cos(rot) - y * math.sin(rot)), sc * (x * math.sin(rot) + y * math.cos(rot)))

    placed = [((sh[0], [tf(p) for p in sh[1]], sh[2]) if sh[0] == "line" else [tf(p) for p in sh], col)
              for sh, col in shapes]
    pts = [p for sh, _ in placed for p in (sh[1] if isinstance(sh, tuple) else sh)]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    m = 2 * SUPERSAMPLE  # keep the whole object in frame, anywhere it fits
    dx = rng.uniform(m - x0, S - m - x1) if S - m - x1 > m - x0 else (S - x0 - x1) / 2
    dy = rng.uniform(m - y0, S - m - y1) if S - m - y1 > m - y0 else (S - y0 - y1) / 2
    for sh, col in placed:
        rgb = jit[col] if isinstance(col, str) else col
        if isinstance(sh, tuple):
            draw.line([(x + dx, y + dy) for x, y in sh[1]], fill=rgb, width=int(sh[2] * sc))
        else:
            draw.polygon([(x + dx, y + dy) for x, y in sh], fill=rgb)
    if rng.random() < OCCLUDE_P:  # one small occluder in a muted colour (a leaf, a post, ...)
        w, h = rng.uniform(6, 14) * SUPERSAMPLE, rng.uniform(6, 14) * SUPERSAMPLE
        x, y = rng.uniform(x0 + dx, x1 + dx - w), rng.uniform(y0 + dy, y1 + dy - h)
        draw.rectangle([x, y, x + w, y + h], fill=hsv(rng.random(), rng.uniform(0.05, 0.2), rng.uniform(0.3, 0.6)))
    img = img.resize((SIZE, SIZE), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.92, 1.06)  # global brightness
    if rng.random() < NOISE_P:
        arr = arr + nrng.normal(0.0, NOISE_SIGMA, arr.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def hsv(h, s, v):
    import colorsys
    return tuple(int(round(255 * ch)) for ch in colorsys.hsv_to_rgb(h, s, v))


# ----------------------------------------------------------------------------------------------------------
# Generation

def _render_job(job):
    c, key, path = job
    render(c, key).save(path, format="PNG", compress_level=1)


def _dump_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _dump_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def differences(path, want):
    """What differs between the world.json at `path` and `want` (version, seed, sizes, domains): one line each."""
    path = Path(path)
    if not path.exists():
        return [f"{path}: no world here"]
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        return [f"{path}: not JSON ({e})"]
    have = dict(version=meta.get("version"), seed=meta.get("seed"), sizes=meta.get("sizes") or {},
                domains=list(meta.get("domains", {})))
    diffs = [f"{k}: {have[k]} here, {want[k]} asked" for k in ("version", "seed", "domains") if have[k] != want[k]]
    return diffs + [f"{k}: {have['sizes'].get(k)} here, {want['sizes'].get(k)} asked"
                    for k in sorted(set(have["sizes"]) | set(want["sizes"]))
                    if have["sizes"].get(k) != want["sizes"].get(k)]


def generate(out_dir, seed=0, classes_per_domain=16, shots=4, test_per_class=8, captions=20, vqa=0,
             knowledge_repeats=6, seen_frac=0.6, name_frac=0.1, name_noise=(0.1, 0.05, 0.05), pattern_frac=0.3,
             instruct_per_image=1, instruct_name_frac=0.1, quizzes=16, quiz_cot=1.0, comparison="describe",
             closed_option_sets=6, extra_per_domain=0, domains=tuple(DOMAINS), workers=2, verbose=False,
             check=False):
    """Write the world into `out_dir` (see the module docstring for the files) and return its Path.
    check=True writes nothing and returns what differs between the world already in `out_dir` (its world.json)
    and the one these arguments would write: version, seed, sizes, domains ([] when it is that world)."""
    t0 = time.time()
    out = Path(out_dir)
    assert shots >= 2, "shots must be >= 2: a triplet's positive is another training image of the class"
    assert 4 <= classes_per_domain <= 64, "classes_per_domain must be in 4..64 (4 options per eval line)"
    assert all(d in DOMAINS for d in domains), f"unknown domain in {domains}: choose from {list(DOMAINS)}"
    assert closed_option_sets >= 1, f"closed_option_sets must be >= 1, got {closed_option_sets}"
    assert 0.0 <= quiz_cot <= 1.0, f"quiz_cot must be in [0, 1], got {quiz_cot}"
    assert comparison in ("difference", "describe"), f"comparison must be difference or describe, got {comparison}"
    assert extra_per_domain >= 0, f"extra_per_domain must be >= 0, got {extra_per_domain}"
    jobs, meta = [], {"generator": "world.py", "version": VERSION, "seed": seed,
                      "sizes": dict(classes_per_domain=classes_per_domain, shots=shots,
                                    test_per_class=test_per_class, captions=captions, vqa=vqa,
                                    knowledge_repeats=knowledge_repeats, seen_frac=seen_frac,
                                    name_frac=name_frac, name_noise=list(name_noise), pattern_frac=pattern_frac,
                                    instruct_per_image=instruct_per_image, instruct_name_frac=instruct_name_frac,
                                    quizzes=quizzes, comparison=comparison,
                                    closed_option_sets=closed_option_sets, quiz_cot=quiz_cot,
                                    # only when used: the worlds written before this option still `--check`
                                    **({"extra_per_domain": extra_per_domain} if extra_per_domain else {})),
                      "image_size": SIZE, "colours": COLOURS, "patterns": list(PATTERNS), "domains": {}}
    if check:  # compare, write nothing
        return differences(out / "world.json", dict(version=VERSION, seed=seed, sizes=meta["sizes"],
                                                     domains=list(domains)))
    if (out / "world.json").exists() and (out / "images").is_dir():
        shutil.rmtree(out / "images")  # a previous world: stale images would survive otherwise
    out.mkdir(parents=True, exist_ok=True)
    pretrain, cot, nocot, rl, analysis_replay = [], [], [], [], []
    evals = {}

    def image(c, split, idx):
        rel = (f"images/{split}/{c.domain}/{idx:05d}.png" if split == "pretrain"
               else f"images/{split}/{c.domain}/{c.slug}/{idx:03d}.png")
        jobs.append((c, f"{seed}/{rel}", out / rel))
        return rel

    for d in domains:
        dom = DOMAINS[d]
        classes = make_classes(d, classes_per_domain)
        seen, unseen = split_classes(classes, seed, seen_frac)
        extra = extra_classes(seen, extra_per_domain, seed)
        seen = [c for c in seen if c not in extra]
        assert len(seen) >= 2, f"{d}: need at least 2 seen classes (a triplet's negative is another seen class)"
        split_of = {**{c.name: "seen" for c in seen}, **{c.name: "unseen" for c in unseen},
                    **{c.name: "extra" for c in extra}}
        meta["domains"][d] = {
            "noun": dom.noun, "question": dom.rl_question,
            "attributes": {k: list(v) for k, v in dom.attributes},
            "classes": [{"name": c.name, "attributes": c.a, "split": split_of[c.name],
                         "description": description(c)} for c in classes],
            "seen": [c.name for c in seen], "unseen": [c.name for c in unseen],
            **({"extra": [c.name for c in extra]} if extra else {})}
        rng = seeded(seed, "texts", d)

        # ---- pretraining corpus: knowledge of every class (text only) + captions/VQA of images of all classes
        for c in classes:
            for _ in range(knowledge_repeats):
                for q, a in knowledge(c, classes, rng, comparison):
                    pretrain.append({"messages": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}], "images": []})
            for _ in range(quizzes):
                q, a = quiz(c, classes, rng, quiz_cot > 0 and rng.random() < quiz_cot, comparison)
                pretrain.append({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}], "images": []})
        # every pretraining image (its own pool: never a 4-shot or test image) gets one web-like caption, which
        # names the class (with web noise) in a share `name_frac`, and `instruct_per_image` attribute questions
        # under the later stages' prompts. Only a share `pattern_frac` of the texts about an image mention its
        # pattern: the base model reads patterns unreliably (a perception confusion shared by all classes).
        n_pre, pool = 0, []  # pool: (image, class, did any text about it state its pattern)
        # the same share of every class's images is named, and at least one image of every class (web data names
        # every class somewhere) while name_frac > 0
        n_named = max(1, round(name_frac * captions)) if name_frac > 0 and captions else 0
        for c in classes:
            for i in range(captions):
                rel = image(c, "pretrain", n_pre)
                n_pre += 1
                if i < n_named:
                    q, a = named_caption(c, classes, rng, name_noise, rng.random() < pattern_frac)
                else:
                    q, a = rng.choice(CAPTION_QUESTIONS).format(noun=dom.noun), caption(c, rng.random() < pattern_frac)
                texts = [a]
                pretrain.append({"messages": [{"role": "user", "content": "<image>" + q},
                                              {"role": "assistant", "content": a}], "images": [rel]})
                for _ in range(instruct_per_image):
                    named = rng.random() < instruct_name_frac
                    q, a = instruct(c, rng, rng.random() < pattern_frac, classes if named else None, name_noise)
                    texts.append(a)
                    pretrain.append({"messages": [{"role": "user", "content": "<image>" + q},
                                                  {"role": "assistant", "content": a}], "images": [rel]})
                pool.append((rel, c, any(description(c) in t for t in texts)))  # the whole description: pattern too
                for attr in rng.sample([k for k, _ in dom.attributes], min(vqa, len(dom.attributes))):
                    pretrain.append({"messages": [{"role": "user", "content": "<image>" + dom.vqa[attr]},
                                                  {"role": "assistant", "content": c.a[attr]}], "images": [rel]})

        # ---- analysis replay: every pretraining image asked the class question, answered with only the start of
        # a rationale, its visual analysis in the corpus's own words (seeded apart: the other files do not change)
        analysis_replay.extend(analysis_samples(pool, seen, seeded(seed, "analysis-replay", d)))

        # ---- k-shot training images of seen classes; CoT SFT, answer-only SFT, RL triplets
        train = {c.name: [image(c, "train", i) for i in range(shots)] for c in seen}
        for c in seen:
            q = rng.choice(EVAL_QUESTIONS).format(noun=dom.noun)
            cands = [c] + nearest(c, seen + extra, 3, rng)  # extra classes may be candidates, never the answer
            rng.shuffle(cands)
            # one image and rationale per seen class, asked under each prompt the later stages use (TAPO's RL
            # prompt, the open- and closed-world eval prompts): the tiny model does not transfer across prompt
            # wordings the way Qwen2.5-VL-Instruct does (README, "The embedded world")
            prompts = [rl_prompt("<image> " + meta["domains"][d]["question"]), open_prompt(q),
                       closed_prompt(q, [o.name for o in cands])]
            cand_lists = [cands] * len(prompts)
            # more closed-world questions on the same image, each with other seen distractors in another order,
            # the rationale's candidates = the options as listed: the candidate step can only be learnt as a copy
            for _ in range(closed_option_sets - 1):
                others = [o for o in seen + extra if o.name != c.name]
                opts = [c] + rng.sample(others, min(3, len(others)))
                rng.shuffle(opts)
                prompts.append(closed_prompt(rng.choice(EVAL_QUESTIONS).format(noun=dom.noun), [o.name for o in opts]))
                cand_lists.append(opts)
            for p, cl in zip(prompts, cand_lists):
                user = {"role": "user", "content": "<image>" + p}
                cot.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT_R1}, user,
                                         {"role": "assistant", "content": rationale(c, cl, comparison)}],
                            "images": [train[c.name][0]]})
                nocot.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT_R1}, user,
                                           {"role": "assistant", "content": f"<answer>{c.name}</answer>"}],
                              "images": [train[c.name][0]]})
            for i, anchor in enumerate(train[c.name]):
                pos = rng.choice([p for j, p in enumerate(train[c.name]) if j != i])
                neg_cls = nearest(c, seen, 1, rng)[0]
                neg = rng.choice(train[neg_cls.name])
                rl.append({"images": [anchor], "problem": "<image> " + meta["domains"][d]["question"],
                           "answer": c.name, "image_noisy": [pos], "image_aug": [neg]})

        # ---- eval: test images of seen and unseen classes; options = gt + 3 nearest of the whole domain
        for split, group in (("seen", seen), ("unseen", unseen)):
            rows = []
            for c in group:
                for i in range(test_per_class):
                    rel = image(c, "test", i)
                    rows.append({"image_path": rel,
                                 "question": rng.choice(EVAL_QUESTIONS).format(noun=dom.noun),
                                 "options": [c.name] + [o.name for o in nearest(c, classes, 3, rng)],
                                 "ground_truth": c.name})
            evals[f"{d}_{split}.jsonl"] = rows

    # ---- write
    for rel in {str(j[2].parent) for j in jobs}:
        Path(rel).mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(jobs) > 200:
        from multiprocessing import Pool
        with Pool(workers) as pool:
            pool.map(_render_job, jobs, chunksize=32)
    else:
        for j in jobs:
            _render_job(j)
    random.Random(f"{seed}/shuffle").shuffle(pretrain)
    random.Random(f"{seed}/shuffle-rl").shuffle(rl)
    _dump_json(out / "pretrain.json", pretrain)
    # the share of the corpus that the fine-tuning stages replay: everything except the base model's own answers
    # in the stages' prompt formats (the short "<think> The bird has ... </think>" form), which would compete with
    # the CoT rationale under the very same prompts (measured: CoT SFT then wrote 5 rationales in 768 answers)
    # (the text-only reasoned quizzes of `quiz_cot` are kept: they are in the rationale's own form)
    replay = [s for s in pretrain if "<think>" not in s["messages"][-1]["content"]
              or "Candidates:" in s["messages"][-1]["content"]]
    _dump_json(out / "replay.json", replay)
    _dump_json(out / "analysis_replay.json", analysis_replay)
    _dump_json(out / "cot_sft.json", cot)
    _dump_json(out / "sft_nocot.json", nocot)
    _dump_jsonl(out / "rl_train.jsonl", rl)
    for name, rows in evals.items():
        _dump_jsonl(out / name, rows)
    meta["files"] = {"pretrain.json": len(pretrain), "replay.json": len(replay),
                     "analysis_replay.json": len(analysis_replay), "cot_sft.json": len(cot),
                     "sft_nocot.json": len(nocot),
                     "rl_train.jsonl": len(rl), **{k: len(v) for k, v in evals.items()}, "images": len(jobs)}
    _dump_json(out / "world.json", meta)
    if verbose:
        print(f"world: {len(jobs)} images, " + ", ".join(f"{k} {v}" for k, v in meta["files"].items()
                                                           if k != "images") + f" -> {out} in {time.time() - t0:.1f} s")
    return out


def preview(out_dir, per_class=6):
    """Contact sheets `preview_DOMAIN.png`: one row per class (name, split, attributes), `per_class` images."""
    out = Path(out_dir)
    meta = json.loads((out / "world.json").read_text())
    paths = []
    for d, info in meta["domains"].items():
        W, rows = 260, info["classes"]
        sheet = Image.new("RGB", (W + per_class * SIZE, len(rows) * SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for r, c in enumerate(rows):
            cls = WorldClass(d, c["name"], tuple(c["attributes"].items()))
            draw.text((4, r * SIZE + 8), f"{c['name']} ({c['split']})", fill=(0, 0, 0))
            for k, line in enumerate(description(cls).split(", ")):
                draw.text((4, r * SIZE + 30 + 14 * k), line, fill=(60, 60, 60))
            for i in range(per_class):
                sheet.paste(render(cls, f"preview/{meta['seed']}/{c['name']}/{i}"), (W + i * SIZE, r * SIZE))
        p = out / f"preview_{d}.png"
        sheet.save(p)
        paths.append(p)
    return paths


def main():
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    # Output
    p.add_argument("--out", required=True, help="world folder to write (the image root of every file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, images and texts")
    p.add_argument("--preview", action="store_true", help="also write preview_DOMAIN.png contact sheets")
    p.add_argument("--check", action="store_true",
                   help="write nothing: exit 0 if --out already holds the world these flags write (version, seed, "
                        "sizes, domains), else exit 2 naming what differs (run.sh's guard against a stale folder)")
    # Sizes
    p.add_argument("--classes-per-domain", type=int, default=16, help="classes per domain (60%% seen)")
    p.add_argument("--seen-frac", type=float, default=0.6, help="fraction of seen classes (paper: 60%%)")
    p.add_argument("--shots", type=int, default=4, help="training images per seen class (paper: 4-shot)")
    p.add_argument("--test-per-class", type=int, default=8, help="eval images per class, seen and unseen")
    p.add_argument("--captions", type=int, default=20, help="captioned pretraining images per class")
    p.add_argument("--vqa", type=int, default=0,
                   help="attribute questions per captioned image (measured: learnt far slower than captions)")
    p.add_argument("--knowledge-repeats", type=int, default=6, help="copies of each class's knowledge texts "
                   "(6: the base recalls every class from its description, 48 of 48 at seed 0; 3: 37 of 48)")
    p.add_argument("--name-frac", type=float, default=0.1,
                   help="share of pretraining images whose caption names the class (web-like, with --name-noise)")
    p.add_argument("--name-noise", type=float, nargs=3, default=(0.1, 0.05, 0.05), metavar=("CONGENER", "GENUS", "SUPER"),
                   help="of the naming captions: shares naming the nearest class, only the genus, only the super-category")
    p.add_argument("--pattern-frac", type=float, default=0.3,
                   help="share of texts about a pretraining image that mention its pattern (the base reads it unreliably)")
    p.add_argument("--instruct-per-image", type=int, default=1,
                   help="attribute questions per pretraining image under the RL / open / closed prompts (format)")
    p.add_argument("--instruct-name-frac", type=float, default=0.1,
                   help="share of those questions that ask the class (answered with the web's noisy name)")
    p.add_argument("--quizzes", type=int, default=16, help="text-only field-guide questions per class under the "
                   "RL / open / closed prompts (description -> name, no image); the unseen classes' lookup (8: 17%% "
                   "fewer base tokens, but CoT SFT 5 and 28 points lower on closed-world unseen classes, seeds 19 "
                   "and 40)")
    p.add_argument("--quiz-cot", type=float, default=1.0,
                   help="share of the quizzes answered with the whole four-part rationale in words (candidates = "
                        "the options under the closed prompt): the base model reasons about descriptions, for every class")
    p.add_argument("--comparison", choices=("difference", "describe"), default="describe",
                   help="the rationale's comparison step: each candidate's differences from the class, or each "
                        "candidate's whole description recalled from knowledge")
    p.add_argument("--closed-option-sets", type=int, default=6,
                   help="closed-world SFT questions per seen class; beyond the first, each lists other random seen "
                        "classes as options and the rationale's candidates copy them")
    p.add_argument("--extra-per-domain", type=int, default=0,
                   help="seen classes per domain made 'extra': in the corpus like every class, and named as "
                        "candidates and options in the SFT files, but never an answer there, with no training or "
                        "test image (the classes a real base model knows outside the benchmark); 0 = none")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS), help="domains")
    p.add_argument("--workers", type=int, default=2, help="processes for image rendering (0 or 1: in-process)")
    args = p.parse_args()
    if args.closed_option_sets < 1:
        p.error(f"--closed-option-sets must be >= 1, got {args.closed_option_sets}")
    n_seen = round(args.seen_frac * args.classes_per_domain)
    if not 0 <= args.extra_per_domain <= n_seen - 2:
        p.error(f"--extra-per-domain must be in 0..{n_seen - 2} (it takes seen classes, and {n_seen} seen classes "
                f"leave at least 2 for the triplets), got {args.extra_per_domain}")
    if not 0.0 <= args.quiz_cot <= 1.0:
        p.error(f"--quiz-cot must be in [0, 1], got {args.quiz_cot}")
    run = dict(seed=args.seed, classes_per_domain=args.classes_per_domain, shots=args.shots,
               test_per_class=args.test_per_class, captions=args.captions, vqa=args.vqa,
               knowledge_repeats=args.knowledge_repeats, seen_frac=args.seen_frac, name_frac=args.name_frac,
               name_noise=tuple(args.name_noise), pattern_frac=args.pattern_frac,
               instruct_per_image=args.instruct_per_image, instruct_name_frac=args.instruct_name_frac,
               quizzes=args.quizzes, quiz_cot=args.quiz_cot, comparison=args.comparison,
               closed_option_sets=args.closed_option_sets, extra_per_domain=args.extra_per_domain,
               domains=tuple(args.domains), workers=args.workers)
    if args.check:
        diffs = generate(args.out, check=True, **run)
        if diffs:
            p.exit(2, f"world.py: {args.out} holds another world than the one asked for: " + "; ".join(diffs) +
                   " (use another output folder, or delete this one to regenerate it)\n")
        return
    out = generate(args.out, verbose=True, **run)
    if args.preview:
        for path in preview(out):
            print(f"preview: {path}")


if __name__ == "__main__":
    main()
