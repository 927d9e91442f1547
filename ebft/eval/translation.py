"""Translation evaluation beyond BLEU and chrF (``ebft.execution.bleu``): best-of-k aggregation
and COMET-22 run out of process. COMET needs torch and a model download of its own, so it runs in a
separate Python environment given by ``comet_python``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from ebft.execution.bleu import same_length

COMET_MODEL = "Unbabel/wmt22-comet-da"
COMET_HOWTO = ("COMET needs its own environment: python -m venv ~/comet-env && ~/comet-env/bin/pip install "
               "unbabel-comet; then set eval.comet_python=~/comet-env/bin/python")


class MetricUnavailable(RuntimeError):
    """A metric that cannot be computed here; the message says how to set it up."""


def oracle_indices(scores_per_instance: Sequence[Sequence[float]], k: int) -> list[int]:
    """Per instance, the index of the best of its first ``k`` samples (e.g. by COMET,
    to report the BLEU of the COMET-oracle sample)."""
    if k < 1:
        raise ValueError(f"best-of-k needs k >= 1, got {k}")
    short = [i for i, s in enumerate(scores_per_instance) if len(s) < k]
    if short:
        raise ValueError(f"best-of-{k} needs {k} samples per instance; instance {short[0]} has "
                         f"{len(scores_per_instance[short[0]])}")
    return [max(range(k), key=lambda j: scores[j]) for scores in scores_per_instance]


def best_of_k(scores_per_instance: Sequence[Sequence[float]], k: int) -> float:
    """Per-instance maximum over the first ``k`` samples, averaged over instances (the paper's best-of-k)."""
    if not scores_per_instance:
        raise ValueError("best_of_k needs at least one instance")
    best = oracle_indices(scores_per_instance, k)
    return sum(s[j] for s, j in zip(scores_per_instance, best)) / len(best)


_COMET_SCRIPT = """\
import json, sys
try:
    from comet import download_model, load_from_checkpoint
except ImportError as err:
    sys.stderr.write(f"unbabel-comet is not installed in this environment: {err}\\n")
    sys.exit(3)
request = json.load(open(sys.argv[1]))
model = load_from_checkpoint(download_model(request["model"]))
data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(request["srcs"], request["hyps"], request["refs"])]
output = model.predict(data, batch_size=request["batch_size"], gpus=request["gpus"], progress_bar=False)
json.dump([float(x) for x in output.scores], open(sys.argv[2], "w"))
"""


def comet_scores(srcs: Sequence[str], hyps: Sequence[str], refs: Sequence[str], comet_python: str | None = None,
                 model: str = COMET_MODEL, batch_size: int = 32, gpus: int = 0) -> list[float]:
    """Segment-level COMET scores, computed by ``comet_python`` (an interpreter with
    ``unbabel-comet`` installed) in a subprocess. Raises ``MetricUnavailable`` with
    the setup steps when it is not configured or fails."""
    same_length(hyps, refs)
    same_length(srcs, hyps)
    if not comet_python:
        raise MetricUnavailable(f"COMET is not configured. {COMET_HOWTO}")
    if not Path(comet_python).expanduser().is_file():
        raise MetricUnavailable(f"comet_python={comet_python} does not exist. {COMET_HOWTO}")
    with tempfile.TemporaryDirectory(prefix="ebft-comet-") as tmp:
        request, result = Path(tmp, "request.json"), Path(tmp, "scores.json")
        request.write_text(json.dumps({"srcs": list(srcs), "hyps": list(hyps), "refs": list(refs),
                                       "model": model, "batch_size": batch_size, "gpus": gpus}))
        proc = subprocess.run([str(Path(comet_python).expanduser()), "-c", _COMET_SCRIPT, str(request), str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise MetricUnavailable(f"COMET failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                                    f"{COMET_HOWTO}")
        return json.loads(result.read_text())
