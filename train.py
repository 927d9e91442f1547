"""Fine-tune a causal LM with SFT, EBFT or RLVR: `python train.py method=ebft task=qa_code`."""

import hydra
from omegaconf import DictConfig

from ebft.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
