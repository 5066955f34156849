"""Emergent-misalignment (EM) directions: the suite's direction machinery applied to EM.

    judge        labels a sampled response misaligned / aligned / other, and coherent or not
    settings     the typed `em` config section (no torch)
    models       one family's base and its EM fine-tunes, loaded together
    generation   seeded sampled generations of prompt sets under planned conditions
    activations  answer-token means and per-token residuals, through the batched traces
    directions   response-level diff-of-means, separation accuracy, cosine matrices
    conditions   steering, ablation, transfer ablation and matched random controls
    pipeline     run(cfg): one family's store, stage by stage, then its EM table

Layout of the groups it writes: routing_suite/store_format.py.
"""
