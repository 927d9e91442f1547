"""A small, CPU-sized reproduction of the paper's Q&A coding comparison: ``python -m experiments.repro``.

From one command (settings in ``conf/experiment/repro_small.yaml``, section ``repro``):

1. optionally (``--lr-sweep``) short runs per method at a few learning rates, chosen on the
   held-out VALIDATION split (val CFM, ties broken by val CE) -- :mod:`experiments.repro.sweep`;
2. SFT, EBFT (two alphas) and RLVR on the same data budget, for every seed (``train.py``);
3. the base model and every run through ``evaluate.py``: held-out CE, CFM and the FM profile, then
   HumanEval / MBPP greedy, pass@1 and pass@k on a fixed subset of problems;
4. ``README.md`` with the Table-1-shaped comparison (mean +- s.d. over seeds), plots, per-run
   numbers with their directories, verdicts and a diagnosis computed from the runs' ``metrics.csv``.

Modules: :mod:`~experiments.repro.settings` (config + flags), :mod:`~experiments.repro.plan` (the jobs and
``plan.json``), :mod:`~experiments.repro.jobs` (running them, resumably), :mod:`~experiments.repro.sweep`,
:mod:`~experiments.repro.tables` (results, aggregates, verdicts), :mod:`~experiments.repro.diagnosis`,
:mod:`~experiments.repro.figures`, :mod:`~experiments.repro.readme`.
"""
