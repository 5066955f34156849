"""The layout of a run store: the contract between the stages and the aggregator.

One zarr v3 store per run (one cell: model pair x behaviour x settings),
written through xarray, one group per stage. Every stage reads what earlier
stages wrote, so any stage can be rerun alone.

Naming: a store in progress is a folder ending in `.zarr.partial`; it is
renamed to end in `.zarr` once every stage has finished (root attribute
`complete` true). Stores live under
`<store.root>/<model name>/<behavior>/<config digest>.zarr`.

Root attributes (provenance and state)
    schema_version   int, SCHEMA_VERSION
    cell             {"family", "behavior", "model"}: what the run studies
    finished_at      ISO time the run completed (absent while running)
    config           the resolved config, secrets removed
    experiment       "routing" (the groups below up to "outcomes"), "adl" (the
                     adl_* groups) or "em" (the em_* groups); a store without
                     it is a routing store
    config_digest    sha256 of the parts of the config that shape the results
                     (EM and EM-transfer stores add "em_code", the version of
                     their stages' code, `em.pipeline.EM_CODE_VERSION`, and the
                     models' weight hashes)
    versions         {package: version} of the stack
    model_identity   what identifies the weights (names, revisions, hashes)
    seed             int
    cpu_capability   the CPU kernels torch ran (e.g. "AVX512")
    cpu_model        the processor's model name (recorded, never keyed on)
    kernel_fingerprint  hash of the bits a probe training step's kernels give
                     here at the run's thread count (organisms key on it)
    torch_threads    torch's thread count in the run
    git_commit       the suite's commit, or "unknown"
    stages_done      list of finished stage names, in order
    complete         true once every stage of the run has finished

Group "activations" (the collect stage)
    dims    model, framing, prompt, layer, position, hidden, head, head_dim, batch
    coords  model ["base", "finetuned"], framing ["eval", "deploy"],
            prompt (ids), layer (ints), position (labels such as "last",
            "first0".."first4", "answer_mean"), head (ints),
            split (prompt: "fit" | "test"), answer (prompt), topic (prompt),
            eval_prompt / deploy_prompt (prompt: the texts)
    vars    resid, attn, mlp   (model, framing, prompt, layer, position, hidden)
            heads              (model, framing, prompt, layer, position, head, head_dim)
            done               (prompt) bool: prompts whose values are written (per
                               prompt, so a rerun with another batch size resumes;
                               older stores have batch_done (batch), read once into done)
    Only the sites the config asks for are present.

Group "fit"
    vars    direction       (model, site, layer, hidden)  mean paired difference
            direction_norm  (model, site, layer)
            probe_accuracy  (model, site, layer)         held-out, eval vs deploy
            subspace        (model, site, layer, rank, hidden) orthonormal rows
            cos_base_finetuned (site, layer)
            diff_change_norm   (site, layer)  |mean diff(ft) - mean diff(base)|

Group "localize"
    vars    layer_effect  (source, layer)        fraction of the gap restored
            head_effect   (source, layer, head)
            window_effect (source, first, last)  every layer of [first, last] patched at once
            token_prob_gap (source)              the gap in P(performed token)
            window_estimate (source, first, last) method "attribution" only
            weight_effect (layer)   the base with the fine-tune's LoRA updates at
                                    that layer only (NaN: not a LoRA fine-tune;
                                    absent in stores written before it existed)
            check_first, check_last (candidate)  the window check's tries on the
                                    localize split (routing.window_check), in order;
            check_reduction, check_deploy_lost, check_correct_lost, check_lost_upper,
            check_intact  (candidate)   the clamp's reduction there, the fractions
                                    of the baseline's successes it loses, the
                                    larger loss's upper bound, and whether it
                                    passed (absent when
                                    localize.check_windows=0, intervention.window
                                    was given, or in stores from before the check)
    coords  source ["deploy_to_eval", "finetuned_to_base"]
    attrs   window [first_layer, last_layer] (the window the intervention uses:
            after the check, when it ran), rule_window (the rule's own pick),
            check ("kept", "moved", "none intact: ..." or "none reducing: ..."), rule (how it was picked), method
            ("exact": every effect patched; "attribution": layer_effect,
            head_effect and window_estimate are first-order estimates and
            window_effect holds the exact effects of the `confirmed` windows
            only, NaN elsewhere; stores written before `method` existed are exact)

Group "outcomes" (per prompt, so the aggregator can bootstrap)
    dims    condition, framing, prompt
    vars    performed     (condition, framing, prompt) float in [0, 1]; a
                          control with several seeds stores the mean over seeds
            correct       (condition, framing, prompt) float in [0, 1]
            perturbation_norm (condition) mean L2 norm of the change made
            aligned_mean, aligned_count (framing, target_layer, offset, hidden)
                          and (framing, offset): the aligned clamp's per-position
                          targets (positions=aligned); step_mean, step_count
                          (framing, target_layer, step, hidden), (framing, step):
                          its per-generation-step ones (steps=all)
    coords  condition: "baseline", the intervention's name (e.g. "clamp"),
            then the controls ("random", "orthogonal", "non_routing",
            "semantic", ...); kind (condition): "baseline" | "intervention" |
            "control" | "comparison"
    attrs   intervention, controls, window

ADL stores (experiment "adl", `routing_suite.adl`; stages adl_mean,
adl_readout, adl_steer, adl_causal; root attribute `adl` holds the chosen
position, the attention-sink positions never chosen, the steering layer, the
number of unrelated texts and the text source)

Group "adl_sums" (streamed: one part per `adl.texts_per_part` unrelated texts)
    dims    part, layer, position, hidden
    vars    diff, mean_base, mean_finetuned (part, layer, position, hidden): the
                part's mean of h_ft - h_base, h_base, h_ft over its texts (residual
                stream after the layer, position "first<i>": the i-th token after <bos>)
            norm_finetuned (part, layer, position)  mean |h_ft|
            count          (part, position)         texts that reach the position
            done           (part) bool: parts whose values are written

Group "adl_mean" (the parts combined, count-weighted)
    vars    diff, mean_base, mean_finetuned (layer, position, hidden)
            norm_finetuned (layer, position); count (position)
    attrs   n_texts

Group "adl_readout"
    dims    readout ["logit_lens", "patchscope"],
            source ["difference", "base_mean", "finetuned_mean"], layer, position, rank
    vars    top_id, top_token, top_prob, relevant  (readout, source, layer, position, rank)
            relevance (readout, source, layer, position): share of the top tokens
                that the grader calls relevant to the fine-tuning data
            characteristic_z (characteristic): the statistic grader's tokens and z
    attrs   grader, identity_prompts, scales

Group "adl_steer"
    dims    direction ["difference", "random"], alpha, prompt
    vars    completion, log_ppl (under the base model), similarity (to the
            fine-tuning data), distinct (distinct token ids / token ids)
            (direction, alpha, prompt); coherent (direction, alpha)
    coords  prompt_text (prompt)
    attrs   best_alpha, similarity_unsteered, similarity_steered, similarity_gain,
            similarity_random, log_ppl_bound, distinct_bound, layer, norm,
            similarity_measure

Group "adl_causal"
    dims    data ["finetune", "unrelated"], condition ["difference", "random"], layer, model
    vars    delta_ce, delta_ce_se (data, condition, layer): CE after projection
                replacement minus the fine-tune's CE, and its standard error
            ce (data, model ["base", "finetuned"])
    coords  n_texts (data)

EM stores (experiment "em", `routing_suite.em`; cell behavior "em"; stages
em_samples, em_activations, em_directions, em_outcomes). Models: "base", each
narrow misaligned fine-tune and the honest control, by dataset name.

Group "em_samples" (every general prompt, both splits)
    dims    model, prompt, sample
    vars    completion, label ("misaligned" | "aligned" | "other"), coherent (model, prompt, sample)
            general (model, prompt): the prompt is in the model's general set (em_task.EmDataset.general)
            narrow (model, prompt): the prompt is of a topic the model trained on (its narrow domain)
    coords  prompt_text, truth, topic, form ("question" | "statement"), split ("fit" | "test") (prompt)

Group "em_activations"
    vars    resid (finetune, prompt, sample, layer, hidden): answer-token mean residual
                of the misaligned fine-tunes' own responses (NaN outside their general prompts)

Group "em_directions"
    vars    direction (finetune, layer, hidden): mean(misaligned) - mean(aligned), fit split
                (attrs.balance "prompt": within each prompt answered both ways, averaged
                over those prompts; "none": pooled classes)
            direction_norm, separation_accuracy (finetune, layer): balanced, test split
            has_direction (finetune); n_responses (finetune, split, label)
            paired_prompts (finetune): fit-split prompts answered both ways
            cosine (finetune, finetune_b, layer)
            persona organisms only (`em.directions.add_planted`): planted (layer, hidden): the
                base's misaligned - aligned context residual at a question of another topic
                (last token, fit split); planted_separation (layer): held-out, balanced;
                planted_cosine (finetune, layer): each direction's cosine with it
    attrs   min_per_class, balance, steer_layer

Group "em_outcomes" (test split, per response; NaN outside the model's general prompts)
    dims    condition, prompt, sample
    vars    misaligned, aligned, coherent (condition, prompt, sample): a control
                with several random seeds stores the mean over seeds
            perturbation_norm (condition): mean L2 change norm; n_seeds (condition)
    coords  condition names "<model>/baseline", "<ft>/ablate/own", "<ft>/ablate/layer<L>",
            "<ft>/ablate/own/random", "<ft>/ablate/from/<other ft>", "base/steer/<ft>/x<lambda>"
            (and "/random"), persona organisms: "<ft>/ablate/planted" (and "/random");
            decision-token clamps (em.decision_clamp; at the prompt's last token, every
            layer): "<ft>/clamp/own", "<ft>/clamp/planted" (and "/random"),
            "<ft>/clamp/from/<other ft>" (to the base's mean coordinate there), and
            "base/clamp-to/<ft>/shift|own|planted" (and "/random"; to the fine-tune's);
            per condition: model, kind ("baseline" | "steer" | "ablate" | "transfer" |
            "control"), source, lam, control, target, mode ("steer" | "ablate" | "clamp"), layers
    attrs   steer_layer, ablate_layer, ablate_layers (the layer-wise ablations' layers; absent: every layer),
            ablate_to ("zero" or "base_mean", `em.ablate_to`; absent: zero),
            ablate_at ("every" or "decision", where the ablations and their controls edit,
            `em.ablate_at`; absent: every)

EM transfer stores (experiment "em_transfer", `routing_suite.em.transfer_pipeline`;
cell family = the receiver, behavior "em_from_<donor>", plus donor and receiver;
stages xfer_maps, xfer_outcomes; `family_stores` names the two EM stores read).
Directions (in the receiver's space, per layer): "mapped" (the donor's, carried by
the ridge map), "native" (the receiver's own), "random#<s>", "orthogonal#<s>",
"wrong_layer", "wrong_source".

Group "xfer_maps"
    dims    finetune, vector (the direction names above), layer, hidden, donor_hidden, map_text
    vars    direction (finetune, vector, layer, hidden); direction_norm,
                cosine_native (with the native direction), separation (balanced held-out
                accuracy on the receiver fine-tune's responses) (finetune, vector, layer)
            has_direction (finetune): both families have that kind's direction
            map_r2, map_r2_token (token identity alone), map_alpha, donor_layer (layer)
            map_weight (layer, donor_hidden, hidden), map_x_mean (layer, donor_hidden),
                map_y_mean (layer, hidden): y = (x - x_mean) W + y_mean; map_heldout (map_text): the texts
                the R^2 is measured on (coordinate map_text: every neutral text)
    coords  control ("" | "random" | "orthogonal" | "wrong_layer" | "wrong_source"),
                seed (-1 when not drawn) (vector)
    attrs   donor, receiver, steer_layer (the receiver's), n_texts, n_tokens, n_heldout_texts

Group "xfer_outcomes" (the receiver's test split; layout of "em_outcomes")
    coords  condition names "<ft>/baseline", "<ft>/ablate/<direction>" (controls matched
            at every activation to the mapped ablation's change norm, random draws averaged),
            "<ft>/clamp/<direction>" (decision-token clamps, em.decision_clamp: the coordinate
            at the prompt's last token set to the receiver base's mean there; controls
            matched to the mapped clamp), "base/baseline", "base/steer/<ft>/x<lambda>/<direction>" (all at lambda x
            the native direction's norm)
    attrs   steer_layer, donor, receiver, ablate_layers (absent: every layer), ablate_to ("zero" or "base_mean",
            `em.ablate_to`; absent: zero), ablate_at ("every" or "decision", `em.ablate_at`; absent: every)
"""

SCHEMA_VERSION = 1

MODELS = ("base", "finetuned")
FRAMINGS = ("eval", "deploy")
STAGES = ("collect", "fit", "localize", "intervene")
ADL_STAGES = ("adl_mean", "adl_readout", "adl_steer", "adl_causal")
EM_STAGES = ("em_samples", "em_activations", "em_directions", "em_outcomes")
EM_TRANSFER_STAGES = ("xfer_maps", "xfer_outcomes")

BASELINE = "baseline"
# "comparison": a condition reported beside the others but neither the
# intervention nor a control (the base model's own subspace, applied the same way).
CONDITION_KINDS = ("baseline", "intervention", "control", "comparison")

# What "reduced", "broken" and "near zero" mean: routing_suite.routing.stats.

STORE_SUFFIX = ".zarr"
PARTIAL_SUFFIX = ".zarr.partial"
