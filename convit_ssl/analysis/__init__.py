"""The paper's analyses of a ConViT, in pure PyTorch: gating, positional
centres and spans, nonlocality and attention maps, measured on the real
hidden states of each block.

    from convit_ssl.analysis import collect_attention, nonlocality, attention_maps, analyze
    layers = collect_attention(model, images)      # one forward, eval mode, no grad
    nonlocality(layers)                            # (layers, heads) mean attention distance
    attention_maps(layers)                         # centre-query maps per layer
    analyze(model, images)                         # everything, JSON-serialisable

Figures live in `convit_ssl.analysis.plots` (`gating_figure`,
`nonlocality_figure`, `attention_figure`, `curves_figure`, `save_png`); it
imports matplotlib, so this package does not import it. The training hook's
log (schema, reader): `convit_ssl.analysis.training_log`.
"""

from convit_ssl.analysis.collect import LayerAttention, attention_kinds, collect_attention, evaluating
from convit_ssl.analysis.maps import attention_maps, centre_query
from convit_ssl.analysis.nonlocality import mean_attention_distance, nonlocality, patch_attention
from convit_ssl.analysis.positional import gates, locality_strengths, positional_centres, positional_spans
from convit_ssl.analysis.report import analyze, to_plain

__all__ = [
    "LayerAttention",
    "analyze",
    "attention_kinds",
    "attention_maps",
    "centre_query",
    "collect_attention",
    "evaluating",
    "gates",
    "locality_strengths",
    "mean_attention_distance",
    "nonlocality",
    "patch_attention",
    "positional_centres",
    "positional_spans",
    "to_plain",
]
