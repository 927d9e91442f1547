"""The known-answer bench: EBFT against SFT where the truth is exact (``python -m experiments.synthetic``).

A tiny Llama is pretrained by CE on a broad process (a mixture of seeded hidden Markov models,
:func:`ebft.data.synthetic.mixture`) and fine-tuned on a small set of a task process built from its
components; every model is tested with exact truth metrics (:func:`ebft.eval.oracle.exact_kl`: the
reverse KL of its rollouts and the forward KL, through the process's forward filter), CE and CFM.
Stages (each read back from ``--runs`` when done; settings in ``settings.yaml``):

1. ``pretrain``: the base to its validation plateau (fresh data every step); the yardstick, the base
   fine-tuned by SFT on plenty of task data;
2. ``finite data``: for each training-set size and seed, SFT early-stopped on validation CE against
   EBFT from the base (checkpoint chosen by the same rule), EBFT warm-started from SFT's checkpoint and
   the CE-only ablation (``rl_coef = 0``); lrs chosen per method and size on the first seed's
   validation CE; ablations of EBFT (gamma, whitening, alpha) at one size;
3. ``controls``: the converged null (more SFT vs EBFT from the yardstick on fresh data) and the
   positive control (the yardstick's logits scaled down, then EBFT with gamma = 0);
4. ``report``: ``README.md`` with the figure, paired tables (intervals over seeds and over test
   units), the design check and a verdict (:mod:`experiments.synthetic.report`).

The runs use the fast harness (:mod:`experiments.synthetic.harness`): the library's update in a plain
loop, many runs per process.
"""
