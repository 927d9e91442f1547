"""The synthetic testbed: SFT vs EBFT on a known process, with an exact oracle calibration error.

``python -m experiments.synthetic`` (settings in ``conf/experiment/synthetic.yaml``, section
``synthetic``) runs, each stage skipping what is already on disk:

1. ``init``: the random tiny Llama over the process's symbols and its tokenizer (``model.name``);
2. ``base``: the "pretrained" base, CE on the process from the random init (``train.py method=sft``);
   it is the frozen feature network of every later run and of the evaluation;
3. ``lr``: per method, short runs over its lr grid from the base (seed 43), the lr with the lowest
   final validation CFM (validation split of the training rows) is kept;
4. ``runs``: every variant (SFT, EBFT with / without whitening, alpha 0 / 1) and seed at its method's
   lr, the same data, batch and number of steps (``train.py``);
5. ``test``: every model on fresh rows of the process (another ``data.seed``) with ``evaluate.py``'s
   calibration (CE per chunk, CFM per context, FM profile), and the oracle calibration error
   (:mod:`ebft.eval.oracle`) of rollouts from fresh contexts at horizons G = 1..32;
6. ``report``: ``README.md``, csv tables and plots with paired 95% intervals over held-out contexts.
"""
