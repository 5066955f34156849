"""The routing study: where fine-tuning installs a framing-conditional behaviour, and a causal test of it.

    settings   the typed `intervention`, `fit` and `localize` config sections (no torch)
    collect    trace both models under both framings into the run store
    reduce     server-side paired sums for difference-of-means (`experiments.collect collect.reduce=paired_sums`)
    fit        directions, probes and subspaces from the stored activations
    localize   path patching: the window of layers that carries the behaviour
    controls   control conditions, each matched to the intervention by construction
    intervene  generation on held-out prompts under every condition
    cell       run(cfg): one cell end to end, what `python -m experiments.routing` calls

Layout of the groups it writes: routing_suite/store_format.py.
"""
