"""``python -m experiments.repro``: the small reproduction of the paper's Q&A coding comparison, end to end.

    python -m experiments.repro --lr-sweep            # lrs chosen on the validation chunks -> results/repro_small/README.md
    python -m experiments.repro                       # the config's lrs, 2 seeds
    python -m experiments.repro --quick --out /tmp/q  # the whole pipeline on the tiny random model
    python -m experiments.repro --report-only         # rewrite README.md from what is there

Resumable: a job whose directory says it finished is skipped, so the same command continues an
interrupted reproduction (give the same flags: other settings are refused, not mixed).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from experiments.repro import plan as planning
from experiments.repro.jobs import finished, run_all
from experiments.repro.readme import write_report
from experiments.repro.settings import ReproError, Settings, format_lr, load_settings
from experiments.repro.sweep import chosen_lrs, sweep_points


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.repro",
                                description="The small reproduction of the paper's Q&A coding comparison, end to end.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Settings: conf/experiment/repro_small.yaml (section repro).")
    p.add_argument("--out", help="output folder (default results/repro_small; with --quick outputs/repro_small_quick)")
    p.add_argument("--quick", action="store_true", help="tiny random model, a few steps, 2 problems: a pipeline check")
    p.add_argument("--lr-sweep", action="store_true",
                   help="choose each method's lr by short runs on the validation split")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the experiment's trainer.max_steps)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], help="comma-separated seeds")
    p.add_argument("--limit", type=int, help="benchmark problems per benchmark (the first N)")
    p.add_argument("--chunks", type=int, help="held-out chunks for CE and CFM")
    p.add_argument("--profile-chunks", type=int, help="held-out chunks for the FM profile")
    p.add_argument("--mbpp", help="MBPP's mbpp.jsonl (default $EBFT_MBPP; without it MBPP is skipped)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for every run (repeatable), e.g. trainer.accelerator=gpu; "
                        "model/task/data settings reach evaluate.py too")
    p.add_argument("--rlvr", action="store_true", help="also train and evaluate RLVR (no reward at 135M: off by default)")
    p.add_argument("--downstream", action="store_true",
                   help="also evaluate HumanEval/MBPP pass@k (near zero at 135M on a few problems: off by default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at a time (each gets cores/jobs threads); on a 2-core CPU 2 single-thread "
                        "runs do more work per hour than one 2-thread run, and resist other load far better")
    p.add_argument("--dry-run", action="store_true", help="print the planned commands and stop")
    p.add_argument("--report-only", action="store_true", help="only rewrite README.md from the output folder")
    return p.parse_args(argv)


IN_PROGRESS = "lr sweep, in progress: the config's lrs until it ends"


def learning_rates(settings: Settings, sweep: bool, dry_run: bool, argv: list[str],
                   workers: int = 1) -> tuple[dict[str, float], str]:
    """The lr of each method: from the config, or chosen by the lr sweep (run here)."""
    lrs = dict(settings.lr)
    if not sweep:
        return lrs, "config"
    jobs = planning.sweep_jobs(settings)
    if dry_run:
        print("\n".join(job.command for job in jobs))
        print("# the training commands below take the lrs the sweep chooses; shown with the config's")
        return lrs, "lr sweep"
    # a provisional plan (the config's lrs) so that --report-only can show the sweep while it runs
    planning.write_plan(settings, planning.models(settings, lrs), lrs, IN_PROGRESS, argv)
    run_all(jobs, "lr sweep (validation split only)", workers)
    for method, point in chosen_lrs(sweep_points(settings.out, planning.sweep_entries(settings))).items():
        lrs[method] = point.lr
        print(f"   {method}: lr {format_lr(point.lr)} (val CE {point.val_ce:.4f}, val CFM {point.val_cfm:.4f})",
              flush=True)
    return lrs, "lr sweep"


def evaluate_pending(settings: Settings, planned: list[dict], workers: int = 1) -> None:
    """One evaluate.py call per part for the models that have no result of it yet (parts run
    ``workers`` at a time)."""
    jobs = []
    for part in settings.parts:
        planning.check_calls(settings, part)
        todo = planning.pending(planned, planning.read_results(settings.out, part))
        if todo:
            jobs.append(planning.eval_job(settings, part, todo))
        else:
            print(f"\n== evaluation ({part}): every model done before", flush=True)
    run_all(jobs, "evaluation (" + ", ".join(job.name.split(":")[0].removeprefix("evaluate ") for job in jobs) + ")",
            workers)


def fail(err: ReproError) -> int:
    print(f"\npython -m experiments.repro: {err}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.time()
    try:
        settings = load_settings(args.out, args.quick, args.steps, args.seeds, args.limit, args.chunks,
                                 args.profile_chunks, args.mbpp, args.override, args.rlvr, args.downstream)
    except ReproError as err:
        return fail(err)
    if args.report_only:
        print(f"report: {write_report(settings.out)}")
        return 0
    print(f"== reproduction into {settings.out}: {len(settings.variants)} variants x seeds "
          f"{', '.join(map(str, settings.seeds))}, {settings.steps} steps, model {settings.base_ckpt}", flush=True)
    try:
        lrs, source = learning_rates(settings, args.lr_sweep, args.dry_run, argv, args.jobs)
        planned = planning.models(settings, lrs)
        # stages, each trained then evaluated, so that an interrupted reproduction already has a verdict:
        # the headline variants at the first seed (with --lr-sweep at full length: the sweep's runs), the
        # other seeds, then the ablations (first seed only)
        headline = [m for m in planned if m["variant"] not in settings.first_seed_only]
        first = [m for m in headline if m.get("seed") in (None, settings.seeds[0])]
        stages = ((first, "training (first seed)"), (headline, "training (other seeds)"),
                  (planned, "training (ablations)"))
        if args.dry_run:
            print("\n".join(job.command for job in planning.training_jobs(settings, planned)))
            print("\n".join(planning.eval_job(settings, p, planned).command for p in settings.parts))
            return 0
        planning.write_plan(settings, planned, lrs, source, argv)
        for models, stage in stages:
            run_all([job for job in planning.training_jobs(settings, models) if finished(job) is None], stage,
                    args.jobs)
            evaluate_pending(settings, models, args.jobs)
            print(f"report so far: {write_report(settings.out)}", flush=True)
    except ReproError as err:
        if (settings.out / planning.PLAN).is_file():
            print(f"partial report: {write_report(settings.out)}", file=sys.stderr)
        return fail(err)
    report = write_report(settings.out)
    print(f"\n== done in {(time.time() - start) / 60:.1f} min: {report}", flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the running job is stopped too
    sys.exit(main())
