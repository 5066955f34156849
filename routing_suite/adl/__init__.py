"""The Activation Difference Lens: what narrow fine-tuning leaves in activation differences.

    texts      unrelated text, fine-tuning data, chat and identity prompts
    mean_diff  the streamed mean of h_ft - h_base over the first k tokens
    readout    logit lens and patchscope, top tokens
    relevance  which top tokens are characteristic of the fine-tuning data (pluggable grader)
    steer      steering with the difference, strength limited by coherence
    similarity lexical or sentence-embedding similarity to the fine-tuning data
    causal     projection replacement and the change in cross-entropy
    pipeline   run(cfg) -> dict, what `python -m experiments.adl` calls
"""
