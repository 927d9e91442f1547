"""Every run's hf_model/ carries a model card and its resolved config; hub.push uploads the folder."""

import csv
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import ebft
from ebft.config import ConfigError
from tests.test_train import train, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
OVERRIDES = ["model=tiny", "method=ebft", "alpha=0.5", "gamma=0.1", "method.whitening=paper", "data.limit=200",
             "data.val_size=20", "task.seq_len=32", "method.batch_size=2", "trainer.max_steps=1",
             "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "eval.cfm_chunks=2",
             "eval.cfm_train_chunks=0", "hub.push=true", "hub.repo_id=someone/tiny-ebft"]


class Hub:
    """The huggingface_hub API boundary: records the calls a push makes (there is no hub here)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")


def test_run_writes_card_and_config_and_pushes(tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=OVERRIDES, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as under `python train.py ...`
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_dir = str(tmp_path)
    hub = Hub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    summary = train(cfg)

    hf = Path(summary["hf_model"])
    card = (hf / "README.md").read_text()
    with open(tmp_path / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f)]
    final_ce = [float(r["val/ce"]) for r in logged if r.get("val/ce")][-1]
    final_cfm = [float(r["val/cfm"]) for r in logged if r.get("val/cfm")][-1]
    for line in ("| base model | `tiny` |", "| method | EBFT |", "| alpha (diversity weight, eq. 7) | 0.5 |",
                 "| gamma (CE weight) | 0.1 |", "| whitening (eqs. 8-9) | paper |", "| optimizer steps | 1 |",
                 f"| final val/ce | {final_ce:.4f} |", f"| final val/cfm | {final_cfm:.4f} |",
                 f"| library | ebft {ebft.__version__} |",
                 "| data | the embedded offline corpus, task `qa_code`, chunks of 32 tokens, 20 held-out rows (seed 43) |",
                 "python train.py " + " ".join(OVERRIDES)):
        assert line in card, card
    saved = OmegaConf.load(hf / "config.yaml")
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(cfg, resolve=True)
    assert hub.calls == [("create_repo", "someone/tiny-ebft", False, True),
                         ("upload_folder", "someone/tiny-ebft", sorted(p.name for p in hf.iterdir()))]
    assert {"README.md", "config.yaml", "config.json", "tokenizer_config.json"} <= set(hub.calls[1][2])
    assert summary["hub"] == "https://hub.invalid/someone/tiny-ebft/commit/1"


def test_push_needs_a_repo_id():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "hub.push=true"])
    with pytest.raises(ConfigError, match="hub.push=true needs hub.repo_id=<owner/name>, got None"):
        validate(cfg)
