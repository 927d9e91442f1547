"""Running the reproduction's commands: one subprocess per job, resumable, with wall times.

A job is one ``train.py`` or ``evaluate.py`` command line whose Hydra run directory is
``job.directory``. Its output goes to ``<directory>/stdout.log``; ``job.json`` records the exact
command when it starts, and the return code, the wall time and the CPU time when it ends. A job
whose ``job.json`` says it succeeded is skipped on the next call (one that failed or was interrupted
is run again, unless it may fail: the lr sweep keeps a diverged run as its result). An interrupted
training run continues from its last Lightning checkpoint (``ckpt_path=`` added to the same command);
any other job starts over. A finished directory made by a different command is an error, so changed
settings never mix with old outputs silently.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ebft.files import write_json
from experiments.repro.settings import ROOT, ReproError

RECORD = "job.json"
LOG = "stdout.log"


@dataclass(frozen=True)
class Job:
    """One command: ``python <argv...>`` run in the repository root, writing into ``directory``."""

    name: str
    argv: tuple[str, ...]
    directory: Path
    may_fail: bool = False
    discard: tuple[str, ...] = ()   # paths under directory removed once the job succeeded (never read)
    checkpoint: str | None = None   # a train.py run's last checkpoint (relative to directory): resume from it

    @property
    def command(self) -> str:
        """The command as a shell line (``python`` stands for the interpreter running the driver)."""
        return shlex.join(["python", *self.argv])


def read_record(directory: Path) -> dict | None:
    """The ``job.json`` of a directory, or None when the job never finished there."""
    path = Path(directory) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def finished(job: Job) -> dict | None:
    """The record of ``job`` when it already ran to completion (or failed, for a job that may fail).

    Raises :class:`ReproError` when the directory holds the outputs of a different command.
    """
    record = read_record(job.directory)
    if record is None:
        return None
    if record["command"] != job.command:
        raise ReproError(f"{job.directory} holds a run of a different command:\n  was: {record['command']}\n"
                         f"  now: {job.command}\nuse another --out, or delete that directory to rerun it")
    code = record.get("returncode")
    done = code is not None and (code == 0 or (job.may_fail and not interrupted(code)))
    return record if done else None


def interrupted(returncode: int) -> bool:
    """Whether a job ended because it was stopped (SIGINT, SIGTERM, SIGKILL: by the driver, a scheduler or
    the end of a session) rather than by failing: such a job continues later, even one that may fail."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
    return returncode in {*(-s for s in stops), *(128 + s for s in stops)}


GRACE_S = 600   # how long a stopped training run may take to finish its step and save a checkpoint
_live: set[subprocess.Popen] = set()


def _wait(argv: list[str], out, threads: int | None) -> tuple[int, float]:
    """Run ``argv`` in the repository root with its output to ``out``; return its exit code and CPU seconds
    (user + system: on a shared machine the work it did, where its wall time also counts the waiting for a
    core). ``threads`` sets the child's OMP/MKL threads unless the environment already does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    _live.add(proc)   # until it ends: an interruption of the driver stops it (stop_children)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _live.discard(proc)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def stop_children() -> None:
    """Stop every running job (the driver was interrupted): SIGTERM, so that a training run finishes its
    step and saves a checkpoint to resume from, then SIGKILL after ``GRACE_S`` seconds."""
    procs = list(_live)
    for proc in procs:
        proc.terminate()
    deadline = time.time() + GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except (subprocess.TimeoutExpired, ChildProcessError):
            proc.kill()


def run_job(job: Job, index: int, total: int, threads: int | None = None) -> dict:
    """Run ``job`` unless it finished before; print one progress line before and after; return its record.

    Raises :class:`ReproError` when the command fails (and the job may not fail).
    """
    head = f"[{index}/{total}] {job.name}"
    record = finished(job)
    if record is not None:
        print(f"{head}: done before ({record['seconds']:.0f} s), skipped", flush=True)
        return record
    argv = list(job.argv)
    last = job.directory / job.checkpoint if job.checkpoint else None
    earlier = read_record(job.directory)
    if last is not None and last.is_file() and earlier is not None and earlier["command"] == job.command:
        argv.append(f"ckpt_path={os.path.relpath(last, ROOT)}")   # an interrupted run: continue it
        print(f"{head}: resuming from {last}", flush=True)
    elif job.directory.exists():
        shutil.rmtree(job.directory)  # an interrupted or failed attempt: start it over
    job.directory.mkdir(parents=True, exist_ok=True)
    log = job.directory / LOG
    print(f"{head}: running  (log: {log})", flush=True)
    record = {"name": job.name, "command": job.command, "returncode": None,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if len(argv) > len(job.argv):
        record["resumed_with"] = argv[-1]
    write_json(record, job.directory / RECORD)
    start = time.time()
    with log.open("a") as out:
        returncode, cpu = _wait([sys.executable, *argv], out, threads)
    seconds = round(time.time() - start, 1)
    record.update(returncode=returncode, seconds=seconds, cpu_seconds=round(cpu, 1),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(record, job.directory / RECORD)
    if returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        if not job.may_fail or interrupted(returncode):
            raise ReproError(f"{job.name} failed (exit {returncode}) after {seconds:.0f} s; "
                             f"log: {log}\n{tail}")
        print(f"{head}: FAILED after {seconds:.0f} s (kept as a result; log: {log})", flush=True)
        return record
    for name in job.discard:
        path = job.directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    print(f"{head}: done in {seconds:.0f} s", flush=True)
    return record


def run_all(jobs: list[Job], stage: str, workers: int = 1) -> list[dict]:
    """Run ``jobs`` under a stage heading, ``workers`` at a time (each child then gets
    cores / workers threads); return their records in the jobs' order. When the driver is interrupted
    (or a job fails), the running jobs are stopped (:func:`stop_children`)."""
    if not jobs:
        return []
    print(f"\n== {stage}: {len(jobs)} job(s)" + (f", {workers} at a time" if workers > 1 else ""), flush=True)
    if workers <= 1:
        try:
            return [run_job(job, i, len(jobs)) for i, job in enumerate(jobs, 1)]
        finally:
            stop_children()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_job, job, i, len(jobs), threads) for i, job in enumerate(jobs, 1)]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
            stop_children()
