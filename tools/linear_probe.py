#!/usr/bin/env python
"""Converged linear probes of frozen ConViT trunks: scikit-learn's logistic
regression (lbfgs, standardised features) on named trunk features, trained on
a class-balanced fraction of the training images and tested on all the
validation images. A cross-check of VISSL's SGD probes (which stop after a
fixed number of steps) that no step budget can bias.

    python tools/linear_probe.py RUN_OR_CHECKPOINT [...] --data DIR [--fractions 0.1 1] [--seeds 0 1 2]

DIR holds train/<class>/* and val/<class>/*; images go through the demo's
test transform (resize to the trunk's image size, --mean / --std). Each
fraction is drawn per seed (`random_per_class`, as `DATA.TRAIN.SUBSET`);
the printed top-1 is the mean over seeds.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torchvision import transforms as T

from convit_ssl.checkpoints.loader import load_model
from convit_ssl.data.subsets import subset_indices
from convit_ssl.files import is_image
from convit_ssl.images import open_image
from convit_ssl.vissl.model.trunk import named_features


def load_folder(folder: Path, size: int, mean, std):
    """(images (N, 3, size, size), labels) of an image folder, classes in sorted order."""
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    images, labels = [], []
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{folder}: expected one sub-folder of images per class")
    for label, class_folder in enumerate(classes):
        for path in sorted(p for p in class_folder.rglob("*") if is_image(p.name)):
            images.append(transform(open_image(path)))
            labels.append(label)
    return torch.stack(images), np.array(labels)


def features(model, images: torch.Tensor, names, batch: int = 256):
    with torch.no_grad():
        chunks = [named_features(model, images[i : i + batch], names) for i in range(0, len(images), batch)]
    return {name: torch.cat([c[k] for c in chunks]).numpy() for k, name in enumerate(names)}


def probe(train_x, train_y, val_x, val_y, fraction: float, seed: int) -> float:
    chosen = subset_indices(train_y, fraction, "random_per_class", seed)
    scaler = StandardScaler().fit(train_x[chosen])
    classifier = LogisticRegression(max_iter=5000).fit(scaler.transform(train_x[chosen]), train_y[chosen])
    return 100.0 * classifier.score(scaler.transform(val_x), val_y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/linear_probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", help="VISSL run folders or checkpoint files (any format)")
    parser.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    parser.add_argument("--features", nargs="+", default=["lastCLS", "concatPOOL2"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one subset each (fractions < 1)")
    parser.add_argument("--mean", type=float, nargs=3, default=[0.3, 0.3, 0.3], help="default: the demo's")
    parser.add_argument("--std", type=float, nargs=3, default=[0.4, 0.4, 0.4], help="default: the demo's")
    args = parser.parse_args(argv)
    data = Path(args.data)
    loaded = {}
    print(f"| trunk | feature | {' | '.join(f'{f:.0%} of the labels' for f in args.fractions)} |")
    print("|---|---|" + "---|" * len(args.fractions))
    for checkpoint in args.checkpoints:
        model, _ = load_model(checkpoint)
        size = model.img_size[0]
        if size not in loaded:
            loaded[size] = (
                load_folder(data / "train", size, args.mean, args.std),
                load_folder(data / "val", size, args.mean, args.std),
            )
        (train_images, train_y), (val_images, val_y) = loaded[size]
        train_f, val_f = features(model, train_images, args.features), features(model, val_images, args.features)
        for name in args.features:
            cells = []
            for fraction in args.fractions:
                seeds = args.seeds if fraction < 1 else args.seeds[:1]
                cells.append(
                    f"{np.mean([probe(train_f[name], train_y, val_f[name], val_y, fraction, s) for s in seeds]):.1f}"
                )
            print(f"| {checkpoint} | {name} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
