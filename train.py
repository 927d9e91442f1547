"""Fine-tune a causal LM with SFT, EBFT or RLVR: `python train.py method=ebft task=qa_code`."""

import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ebft.app.callbacks import Interrupted
from ebft.app.rundir import removed_if_empty
from ebft.app.run import train
from ebft.config import ConfigError, DataConfigError, check_renamed, train_settings
from ebft.execution.sandbox import IsolationUnavailable
from ebft.files import DirectoryBusy, DiskFull
from ebft.models.loading import ModelSourceError

USER_ERRORS = (ConfigError, DataConfigError, ModelSourceError, IsolationUnavailable, FloatingPointError,
               DirectoryBusy, DiskFull)


def resume_command(output_dir: str) -> str:
    """This run's command line, resuming in place from its last checkpoint."""
    kept = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["python", "train.py", *kept, f"hydra.run.dir={output_dir}", "ckpt_path=last"])


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        with removed_if_empty(cfg.output_dir):   # a bad setting leaves no run directory behind
            train(train_settings(cfg))
    except Interrupted as stop:
        sys.stderr.write(f"train.py: {stop}. Resume with:\n  {resume_command(str(cfg.output_dir))}\n")
        sys.exit(128 + stop.signum)
    except USER_ERRORS as err:
        sys.exit(f"train.py: {err}")


if __name__ == "__main__":
    try:
        check_renamed(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"train.py: {err}")
    main()
