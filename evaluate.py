"""Evaluate fine-tuned models: `python evaluate.py ckpt=<run dir, HF dir or hub id> task=qa_code`.

Several models go into one comparison table: `ckpt=a,b,c` (or `'ckpt=[a,b,c]'`), or one
multirun job per model with `python evaluate.py -m ckpt=a,b,c`.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ebft.config import ConfigError, DataConfigError, check_renamed, evaluate_settings
from ebft.eval.code import BenchmarkDataError
from ebft.eval.runner import evaluate
from ebft.eval.translation import MetricUnavailable
from ebft.execution.programs import ToolchainMissing
from ebft.execution.sandbox import IsolationUnavailable
from ebft.models.loading import ModelSourceError
from ebft.files import DirectoryBusy, DiskFull

USER_ERRORS = (ConfigError, DataConfigError, ModelSourceError, BenchmarkDataError, ToolchainMissing, MetricUnavailable,
               IsolationUnavailable, DirectoryBusy, DiskFull)


def comma_list_as_hydra_list(argv: list[str]) -> list[str]:
    """Outside a multirun, ``ckpt=a,b,c`` means the list ``ckpt=[a,b,c]`` (Hydra would reject it)."""
    if "-m" in argv or "--multirun" in argv:
        return argv
    return [f"ckpt=[{a[5:]}]" if a.startswith("ckpt=") and "," in a and a[5:6] not in "['\"" else a for a in argv]


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        evaluate(evaluate_settings(cfg), report_dir=hc.sweep.dir if multirun else None, job=hc.job.num if multirun else 0)
    except USER_ERRORS as err:
        sys.exit(f"evaluate.py: {err}")


if __name__ == "__main__":
    sys.argv = comma_list_as_hydra_list(sys.argv)
    try:
        check_renamed(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"evaluate.py: {err}")
    main()
