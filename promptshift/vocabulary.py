"""The names every stage uses for the same things, defined once.

Components (TransformerLens hook-point names), token regions (store code = index in
`REGIONS`) and the results directory's table names. Every stage imports them from here;
nothing here imports anything of promptshift's, torch or transformers, so the store, metrics
and report read them where no model library is installed (tests/test_import_rule.py).
"""

from __future__ import annotations

# The four residual-stream sites of a decoder layer, in TransformerLens's names:
# hook_resid_pre (input of the layer), hook_attn_out and hook_mlp_out (what the attention and
# MLP blocks add, after any post-norm), hook_resid_post (output of the layer).
COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")

# Token regions of a rendered conversation (docs/STORE.md, `token_region`). The store keeps a
# region as its index in this tuple, so new regions are only ever appended (`prefix`: an
# instruction put at the start of the user turn, with its separator).
REGIONS = ("sink", "template", "system", "user", "assistant", "gen_prompt", "prefix")
REGION_CODE = {r: i for i, r in enumerate(REGIONS)}
PAD_REGION = -1  # padding slots of a batch or a block
# Scaffolding (text the template or promptshift writes); every other region is message
# content, and a token is labelled by the content it carries.
SCAFFOLD_REGIONS = ("sink", "template", "gen_prompt")

# Tables of the results directory (file stems of <name>.parquet / <name>.csv, described in
# docs/RESULTS.md), by when the metrics stage writes them.
CORE_TABLES = (
    "component_change", "attention_regions", "attention_heads", "attention_layers", "attention_change",
    "output_change", "lens_change", "layer_ranking", "length_impact", "length_tests", "tag_impact",
    "position_change", "internal_vs_output",
)
# always, from the stored continuations and the sweep's declared checks
BEHAVIOUR_TABLES = ("behaviour", "behaviour_checks", "behaviour_pairs", "behaviour_systems", "internal_vs_behaviour")
# only when the store holds the causal analyses (`promptshift causal`)
CAUSAL_TABLES = (
    "causal_patching", "causal_patching_curve", "causal_knockout", "causal_knockout_curve", "causal_steering",
    "causal_steering_curve", "causal_steering_norms", "causal_phrases", "causal_phrase_rank", "causal_tokens",
    "multiturn", "multiturn_attention", "multiturn_turns", "causal_continuation", "causal_continuation_curve",
)
# only when the sweep has instruction prefixes
PLACEMENT_TABLES = ("placement_layers", "placement_compare", "placement_causal")
# every metrics run writes these
TABLES = CORE_TABLES + BEHAVIOUR_TABLES
# written when their inputs exist
OPTIONAL_TABLES = CAUSAL_TABLES + PLACEMENT_TABLES
ALL_TABLES = TABLES + OPTIONAL_TABLES

SUMMARY = "summary.json"
PROVENANCE = "provenance.json"

__all__ = ["ALL_TABLES", "BEHAVIOUR_TABLES", "CAUSAL_TABLES", "COMPONENTS", "CORE_TABLES", "OPTIONAL_TABLES",
           "PAD_REGION", "PLACEMENT_TABLES", "PROVENANCE", "REGIONS", "REGION_CODE", "SCAFFOLD_REGIONS", "SUMMARY",
           "TABLES"]
