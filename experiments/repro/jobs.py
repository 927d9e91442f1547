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
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ebft.reporting import write_json
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
    done = record.get("returncode") is not None and (record["returncode"] == 0 or job.may_fail)
    return record if done else None


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far: on a shared machine the
    work a job did, where its wall time also counts the waiting for a core."""
    t = os.times()
    return t.children_user + t.children_system


def _wait(argv: list[str], out) -> int:
    """Run ``argv`` in the repository root with its output to ``out``; return its exit code. When the
    driver is interrupted (Ctrl-C, SIGTERM), the child is stopped too (terminate, then kill after 30 s)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run_job(job: Job, index: int, total: int) -> dict:
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
    start, cpu = time.time(), _children_cpu()
    with log.open("a") as out:
        returncode = _wait([sys.executable, *argv], out)
    seconds = round(time.time() - start, 1)
    record.update(returncode=returncode, seconds=seconds, cpu_seconds=round(_children_cpu() - cpu, 1),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(record, job.directory / RECORD)
    if returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        if not job.may_fail:
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


def run_all(jobs: list[Job], stage: str) -> list[dict]:
    """Run ``jobs`` in order under a stage heading; return their records."""
    if not jobs:
        return []
    print(f"\n== {stage}: {len(jobs)} job(s)", flush=True)
    return [run_job(job, i, len(jobs)) for i, job in enumerate(jobs, 1)]
