"""Real data: an image-folder dataset (one folder per class) -> the release's files for TAPO and eval.

    python imagefolder.py /data/CUB_200_2011/images --out data/cub --policy /ckpt/Qwen2.5-VL-7B-Instruct \\
        --dataset bird --noun bird --kind species

Writes a seeded seen / unseen class split (paper: 60% seen), a k-shot Stage-2 triplet file of the seen classes
(positive = another training image of the class, negative = the most similar other seen class) and closed-world
eval files with hard-negative distractors. Similarities come from the loaded policy's mean-pooled vision-tower
features (policy.image_embeddings). No CoT rationales: those need a large model to write them (README).

Deliberate choices:
1. Paths are written relative to `--out` and images are not copied.
2. The ground truth is options[0], as in the release's files; eval.py shuffles options by default.

Layer: imagefolder -> policy, data.
"""
import argparse
import json
import os
import random
import re
from pathlib import Path

import torch

from data import IMAGE_EXTS, DataError, load_image
from policy import image_embeddings, load_policy


def folder_label(name):
    """Class label from a folder name: a leading index ("001.") dropped, "_" -> " " (CUB style)."""
    return re.sub(r"^\d+[._-]", "", name).replace("_", " ").strip()


def _write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_from_image_folder(root, out_dir, model=None, processor=None, seed=0, seen_frac=0.6, shots=4,
                            n_options=4, test_per_class=None, dataset=None, noun="object", kind="kind",
                            embed_fn=None, batch_size=16):
    """Write {dataset}_rl_train.jsonl, {dataset}_seen.jsonl, {dataset}_unseen.jsonl and {dataset}_split.json.

    Split: a seeded `seen_frac` of the classes is seen. Seen classes give `shots` training images (the rest
    are seen test images); unseen classes give only test images (at most `test_per_class` per class).
    Similarity: cosine between class means of `embed_fn(images) -> (N, D)` features over `shots` images per
    class (default: policy.image_embeddings of `model` / `processor`, the mean-pooled vision tower).
    Triplets, one per training image: positive = another training image of the class, negative = the training
    image (closest to the anchor) of the most similar other SEEN class. Options: the ground truth first (as
    released) + the n_options - 1 most similar classes of the whole dataset. Returns {name: path}.
    """
    root, out = Path(root), Path(out_dir)
    dataset = dataset or root.name
    if embed_fn is None:
        if model is None or processor is None:
            raise ValueError("build_from_image_folder needs model and processor (or embed_fn) for similarities")
        embed_fn = lambda imgs: image_embeddings(model, processor, imgs, batch_size=batch_size)  # noqa: E731
    assert shots >= 2, "shots must be >= 2: a triplet's positive is another training image of the class"
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    files = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS) for d in folders}
    folders = [d for d in folders if files[d.name]]
    if len(folders) < n_options:
        raise DataError(f"{root}: {len(folders)} class folders with images, need at least {n_options}")
    rng = random.Random(seed)
    order = [d.name for d in folders]
    rng.shuffle(order)
    n_seen = round(seen_frac * len(order))
    seen, unseen = sorted(order[:n_seen]), sorted(order[n_seen:])
    if len(seen) < 2:
        raise DataError(f"{root}: only {len(seen)} seen classes; a triplet needs a negative class")
    imgs = {}
    for c in order:
        fs = list(files[c])
        rng.shuffle(fs)
        imgs[c] = fs
    for c in seen:
        if len(imgs[c]) < shots:
            raise DataError(f"{root / c}: {len(imgs[c])} images, need at least shots={shots}")

    # features: `shots` images per class (the training images of seen classes), unit norm
    classes = sorted(order)
    emb_files = [f for c in classes for f in imgs[c][:shots]]
    feats = embed_fn([load_image(f) for f in emb_files]).float()
    feats = torch.nn.functional.normalize(feats, dim=-1)                          # (N, D)
    owner = [c for c in classes for _ in imgs[c][:shots]]
    means = torch.stack([feats[[i for i, o in enumerate(owner) if o == c]].mean(0) for c in classes])
    means = torch.nn.functional.normalize(means, dim=-1)
    sim = means @ means.T                                                         # (C, C) class similarity
    cidx = {c: i for i, c in enumerate(classes)}
    feat_of = {f: feats[i] for i, f in enumerate(emb_files)}

    def most_similar(c, pool, k):
        others = [o for o in pool if o != c]
        return sorted(others, key=lambda o: (-float(sim[cidx[c], cidx[o]]), o))[:k]

    rel = lambda f: os.path.relpath(os.path.abspath(f), os.path.abspath(out))  # noqa: E731
    label = {c: folder_label(c) for c in classes}
    problem = f"<image> Based on this image, what {kind} of {noun} is shown?"
    rl, neg_class = [], {}
    for c in seen:
        train = imgs[c][:shots]
        neg_class[c] = most_similar(c, seen, 1)[0]
        negs = imgs[neg_class[c]][:shots]
        for i, a in enumerate(train):
            pos = rng.choice([p for j, p in enumerate(train) if j != i])
            neg = max(negs, key=lambda f: float(feat_of[f] @ feat_of[a]))
            rl.append({"images": [rel(a)], "problem": problem, "answer": label[c],
                       "image_noisy": [rel(pos)], "image_aug": [rel(neg)]})
    options = {c: [label[c]] + [label[o] for o in most_similar(c, classes, n_options - 1)] for c in classes}
    questions = [q.format(noun=noun) for q in ("What kind of {noun} is this?", "What is the {noun} shown in "
                 "the photo?", "What type of {noun} is shown in the image?", "Do you know what {noun} this is?")]
    evals = {"seen": [], "unseen": []}
    for split, group in (("seen", seen), ("unseen", unseen)):
        for c in group:
            test = imgs[c][shots:] if split == "seen" else imgs[c]
            for f in test[:test_per_class]:
                evals[split].append({"image_path": rel(f), "question": rng.choice(questions),
                                     "options": options[c], "ground_truth": label[c]})
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rl_train": out / f"{dataset}_rl_train.jsonl", "seen": out / f"{dataset}_seen.jsonl",
             "unseen": out / f"{dataset}_unseen.jsonl", "split": out / f"{dataset}_split.json"}
    _write_jsonl(paths["rl_train"], rl)
    _write_jsonl(paths["seen"], evals["seen"])
    _write_jsonl(paths["unseen"], evals["unseen"])
    paths["split"].write_text(json.dumps({
        "root": str(root), "seed": seed, "seen_frac": seen_frac, "shots": shots,
        "seen": [label[c] for c in seen], "unseen": [label[c] for c in unseen],
        "negative_class": {label[c]: label[o] for c, o in neg_class.items()},
        "options": {label[c]: o for c, o in options.items()}}, indent=1, ensure_ascii=False) + "\n")
    return paths


def main():
    b = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("root", help="dataset folder with one sub-folder of images per class")
    b.add_argument("--out", required=True, help="output folder (paths in the files are relative to it)")
    b.add_argument("--policy", default="tiny", help="policy preset or HF folder whose vision tower gives features")
    b.add_argument("--dataset", default=None, help="dataset name (file prefix); default: the root folder name")
    b.add_argument("--noun", default="object", help="super-category word used in questions (bird, car, ...)")
    b.add_argument("--kind", default="kind", help="RL question 'what {kind} of {noun} is shown?' (species, model)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split, shots and choices")
    b.add_argument("--seen-frac", type=float, default=0.6, help="fraction of seen classes (paper: 60%%)")
    b.add_argument("--shots", type=int, default=4, help="training images per seen class (paper: 4)")
    b.add_argument("--test-per-class", type=int, default=None, help="cap on test images per class")
    args = b.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    model, processor = load_policy(args.policy)
    try:
        paths = build_from_image_folder(args.root, args.out, model, processor, seed=args.seed,
                                        seen_frac=args.seen_frac, shots=args.shots, noun=args.noun,
                                        kind=args.kind, test_per_class=args.test_per_class, dataset=args.dataset)
    except DataError as e:
        raise SystemExit(f"imagefolder.py: {e}")
    for k, v in paths.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
