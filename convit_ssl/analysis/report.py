"""`analyze`: every analysis number of a ConViT on a batch of images, as plain JSON data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from convit_ssl.analysis.collect import GPSA_KIND, attention_kinds, collect_attention
from convit_ssl.analysis.maps import attention_maps, check_query
from convit_ssl.analysis.nonlocality import nonlocality
from convit_ssl.analysis.positional import gates, locality_strengths, positional_centres, positional_spans
from convit_ssl.models.convit import ConViT


def to_plain(value: Any) -> Any:
    """Tensors -> nested lists, tuples -> lists; NaN and inf -> None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def analyze(
    model: ConViT, images: torch.Tensor, query: Sequence[int] | None = None, detail: bool = True
) -> dict[str, Any]:
    """Gates, positional centres and spans, nonlocality and query attention maps
    of `model` on `images` (B, C, H_img, W_img), from one forward in eval mode.
    With ``detail=False`` only gates and nonlocality (what the training hook logs).

    Returns a dict that ``json.dumps(..., allow_nan=False)`` accepts::

        grid: [H, W]                patch grid of the images
        query: [row, col]           query patch of the maps (default the centre)
        num_images: B
        num_heads: heads
        kinds: ["gpsa", ..., "mhsa", ...]   per block
        layers: per block, in order:
            index, kind
            nonlocality: {combined: [heads]} (+ positional, content for GPSA)
            attention_map: GPSA {positional: [heads][H][W], content: [B][heads][H][W],
                           combined: [B][heads][H][W]};
                           MHSA {combined: [B][heads][H][W], class_token: [B][heads]}
            GPSA only: gate [heads], positional_centre [heads][2] as (dx, dy),
                       locality_strength [heads], span [heads]

    Undefined centres (NaN) and infinite spans of non-local heads are None.
    Definitions: `convit_ssl.analysis.nonlocality`, `.positional`, `.maps`.
    """
    records = collect_attention(model, images)
    grid = records[0].grid
    row_col = check_query(query, grid)
    maps = attention_maps(records, row_col) if detail else [None] * len(records)
    nonloc = {term: nonlocality(records, term) for term in ("combined", "positional", "content")}
    gpsa = {"gate": gates(model)}
    if detail:
        gpsa.update(
            positional_centre=positional_centres(model),
            locality_strength=locality_strengths(model),
            span=positional_spans(model),
        )
    gpsa_blocks = [i for i, kind in enumerate(attention_kinds(model)) if kind == GPSA_KIND]
    gpsa_row = {index: row for row, index in enumerate(gpsa_blocks)}  # block index -> row of gates() etc.
    layers = []
    for row, (record, layer_maps) in enumerate(zip(records, maps, strict=True)):
        entry: dict[str, Any] = {"index": record.index, "kind": record.kind}
        terms = ("combined", "positional", "content") if record.kind == GPSA_KIND else ("combined",)
        entry["nonlocality"] = {term: nonloc[term][row] for term in terms}
        if detail:
            entry["attention_map"] = layer_maps
        if record.kind == GPSA_KIND:
            entry.update({name: values[gpsa_row[record.index]] for name, values in gpsa.items()})
        layers.append(entry)
    return to_plain(
        {
            "grid": list(grid),
            "query": list(row_col),
            "num_images": int(images.shape[0]),
            "num_heads": int(model.num_heads),
            "kinds": [record.kind for record in records],
            "layers": layers,
        }
    )
