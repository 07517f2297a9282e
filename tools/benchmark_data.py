#!/usr/bin/env python
"""Loader CPU per image of the shipped ImageNet recipes: VISSL's transform
chain against convit_ssl's split (DATA.TRAIN.DEVICE_AUGMENTATION), in one run.

    python tools/benchmark_data.py [--rounds 7] [--images 24] [--json docs/benchmarks/cpu_data_loaders.json]

For each recipe (pretrain/<method>/*_convit_small_in1k_224_300ep and the
supervised DeiT recipe), from JPEG bytes to the tensors the collator gets, on
one thread:

- VISSL: the recipe's TRANSFORMS as VISSL builds them (`get_transform`) on
  the decoded PIL image;
- ours: the loader's part of the split (`device_augment.LoaderTransform`:
  decode, crops and flips to uint8 crops); the rest runs batched on the
  training device, and its cost on this CPU (one thread, batch of 32 images'
  crops) is reported beside it.

The two are alternated, --rounds times over the same --images images; the
median round gives the time per image. Decoding (PIL, RGB) is timed apart and
included in both. Inputs: scikit-learn's two photographs (427 x 640) and the
same scenes at ImageNet's typical 500 x 375, as JPEG (quality 90). Also
reported: loader cores needed for 1,000 img/s, and host-to-device bytes per
image (float32 crops against uint8 crops).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import convit_ssl.vissl  # noqa: F401  (patches + registration, before VISSL is imported)
from convit_ssl.files import atomic_write_text  # noqa: I001
from convit_ssl.vissl.configs import SSL_METHODS, compose
from convit_ssl.vissl.training import device_augment

RECIPES = {
    "supervised (DeiT recipe)": "pretrain/supervised/supervised_convit_small_in1k_224_300ep",
    **{method: f"pretrain/{folder}/{method}_convit_small_in1k_224_300ep" for method, folder in SSL_METHODS.items()},
}


def jpeg_inputs(count: int) -> dict[str, list[bytes]]:
    """`count` JPEGs of each kind, cycling over scikit-learn's two photographs."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    kinds = {
        "photographs 427x640": photos,
        "ImageNet-size 500x375": [p.resize((500, 375), Image.BICUBIC) for p in photos],
    }
    out = {}
    for kind, images in kinds.items():
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
        out[kind] = [encoded[i % len(encoded)] for i in range(count)]
    return out


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def sample(image: Image.Image) -> dict[str, Any]:
    return {"data": [image], "label": [0], "data_valid": [1], "data_idx": [0]}


def seconds_per_image(fn: Callable[[bytes], Any], inputs: list[bytes]) -> float:
    start = time.perf_counter()
    for data in inputs:
        fn(data)
    return (time.perf_counter() - start) / len(inputs)


def tensor_bytes(output: Any) -> int:
    """Bytes of the tensors of one transformed sample (what goes host -> device)."""
    return sum(t.numel() * t.element_size() for t in output["data"] if isinstance(t, torch.Tensor))


def device_cost(plan: device_augment.Plan, crops: list[torch.Tensor], images: int = 32) -> float:
    """Seconds per image of the device part on this CPU: a batch of `images` images' crops, by position."""
    augment = plan.augment()
    by_size: dict[tuple, list[int]] = {}
    for position, crop in enumerate(crops):
        by_size.setdefault(tuple(crop.shape), []).append(position)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _shape, positions in by_size.items():
            batch = torch.stack([crops[p] for p in positions for _ in range(images)])
            position = torch.tensor(positions).repeat_interleave(images)
            augment(batch, position, generator)
        times.append((time.perf_counter() - start) / images)
    return min(times)


def measure(name: str, config_name: str, inputs: list[bytes], rounds: int) -> dict[str, Any]:
    from vissl.data.ssl_transforms import get_transform

    train = compose([f"config={config_name}"])[1].DATA.TRAIN
    vissl_chain = get_transform(train.TRANSFORMS)
    try:
        plan = device_augment.plan(train)
    except ValueError as e:
        plan, refused = None, str(e)
    ours = device_augment.LoaderTransform(plan) if plan else None
    chains = {"decode": decode, "vissl": lambda d: vissl_chain(sample(decode(d)))}
    if ours:
        chains["ours"] = lambda d: ours(sample(decode(d)))
    for fn in chains.values():  # warm-up
        fn(inputs[0])
    times: dict[str, list[float]] = {key: [] for key in chains}
    for _ in range(rounds):  # alternated: a slow spell of the machine hits every chain alike
        for key, fn in chains.items():
            times[key].append(seconds_per_image(fn, inputs))
    ms = {key: 1000 * statistics.median(t) for key, t in times.items()}
    row: dict[str, Any] = {
        "recipe": name,
        "config": config_name,
        "decode_ms": round(ms["decode"], 3),
        "vissl_ms": round(ms["vissl"], 3),
        "vissl_img_per_s": round(1000 / ms["vissl"], 1),
        "vissl_bytes": tensor_bytes(chains["vissl"](inputs[0])),
    }
    if ours:
        crops = ours(sample(decode(inputs[0])))["data"]
        row.update(
            ours_ms=round(ms["ours"], 3),
            ours_img_per_s=round(1000 / ms["ours"], 1),
            ratio=round(ms["vissl"] / ms["ours"], 2),
            ours_bytes=tensor_bytes({"data": crops}),
            device_ms_this_cpu=round(1000 * device_cost(plan, crops), 3),
        )
    else:
        row["ours"] = f"not split: {refused}"
    return row


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for kind, rows in results.items():
        lines += [
            f"\n{kind}, one core:\n",
            "| recipe | VISSL img/s | ours img/s | ratio | decode ms | cores for 1,000 img/s (VISSL / ours) "
            "| host-to-device bytes per image (VISSL / ours) | device part on this CPU, ms/img |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "ours_ms" in r:
                lines.append(
                    f"| {r['recipe']} | {r['vissl_img_per_s']:.0f} | {r['ours_img_per_s']:.0f} | {r['ratio']:.2f}x "
                    f"| {r['decode_ms']:.2f} | {1000 / r['vissl_img_per_s']:.1f} / {1000 / r['ours_img_per_s']:.1f} "
                    f"| {r['vissl_bytes']:,} / {r['ours_bytes']:,} ({r['vissl_bytes'] / r['ours_bytes']:.0f}x) "
                    f"| {r['device_ms_this_cpu']:.1f} |"
                )
            else:
                lines.append(
                    f"| {r['recipe']} | {r['vissl_img_per_s']:.0f} | - | - | {r['decode_ms']:.2f} "
                    f"| {1000 / r['vissl_img_per_s']:.1f} / - | {r['vissl_bytes']:,} / - | - |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=24, help="images per round")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, Any]]] = {}
    for kind, inputs in jpeg_inputs(args.images).items():
        results[kind] = [measure(name, RECIPES[name], inputs, args.rounds) for name in args.recipes]
    print(markdown(results))
    if args.json:
        report = {
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
            "rounds": args.rounds,
            "images": args.images,
            "numpy": np.__version__,
            "results": results,
        }
        atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
