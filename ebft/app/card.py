"""A model card and the resolved config beside every saved model, and the push to the hub.

A run's ``hf_model/`` gets ``README.md`` (a Hugging Face model card: base model, method, the
paper's knobs ``alpha`` (eq. 7's diversity weight), ``gamma`` (the CE weight) and the whitening
(eqs. 8-9), the data, the steps, the final validation CE and CFM, the command that reproduces
the run and the library version) and ``config.yaml`` (the run's resolved config), so a
checkpoint shared on its own says what it is. A LoRA run's card names the adapters; a QLoRA run's
(``model.quantization=4bit``) says that the base was trained in 4-bit NF4 and that the weights are that
base dequantised plus the merged adapters, not the original full-precision base. With
``hub.push=true hub.repo_id=<owner/name>`` the folder is uploaded with ``huggingface_hub`` at the end
of the run.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

import ebft
from ebft.config import TrainSettings
from ebft.files import write_text
from ebft.models.loading import resolve_dtype
from ebft.models.quantization import DOUBLE_QUANT, QUANT_TYPE

CARD = "README.md"
CONFIG = "config.yaml"
FINAL_METRICS = ("val/ce", "val/ce_answer", "val/cfm", "val/cfm_whitened")


def reproduce_command() -> str:
    """``python train.py`` with the run's command-line overrides (Hydra's record of them when the run
    was launched by Hydra; the process arguments otherwise)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    else:
        overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    return " ".join(["python", "train.py", *map(shlex.quote, overrides)])


def _data(settings: TrainSettings) -> str:
    data = settings.data.source
    kind = str(data.get("kind"))
    if kind == "hub":
        where = f"hub dataset `{data.get('name')}`" + (f" ({data.get('config')})" if data.get("config") else "")
    elif kind == "local":
        files = data.get("files")
        where = "local files " + ", ".join(f"`{Path(str(f)).name}`" for f in
                                           (files if isinstance(files, (list, tuple)) else [files]))
    else:
        where = "the embedded offline corpus"
    return (f"{where}, task `{settings.task.name}`, chunks of {settings.task.seq_len} tokens, "
            f"{settings.data.val_size} held-out rows (seed {settings.data.seed})")


def model_card(settings: TrainSettings, metrics: dict[str, float], steps: int, command: str) -> str:
    """The card's text (YAML front matter + a table of what the run was)."""
    m = settings.method
    method = m.name
    rows = [("base model", f"`{settings.model.name}`"), ("method", method.upper())]
    if settings.model.init_from:
        rows.append(("warm start", f"`{settings.model.init_from}`"))
    lora, note = settings.model.lora, ""
    if lora is not None:
        targets = ", ".join(lora.target_modules) if lora.target_modules else "the attention and MLP projections"
        rows.append(("LoRA", f"rank {lora.rank}, lora_alpha {lora.scale_alpha:g} on {targets}, merged into these "
                             "weights (the adapter alone: `adapter/` beside this folder)"))
    if settings.model.quantization is not None:
        dtype = str(resolve_dtype(settings.model.dtype, settings.device)).removeprefix("torch.")
        rows.append(("base in training", f"4-bit {QUANT_TYPE.upper()} (QLoRA: bitsandbytes"
                                         f"{', double quantisation' if DOUBLE_QUANT else ''}), compute dtype {dtype}; "
                                         f"these weights: that base dequantised to {dtype} + the merged adapters"))
        note = (f"\nThe base model was trained quantised to 4-bit {QUANT_TYPE.upper()} (QLoRA): these weights are that "
                f"4-bit base dequantised to {dtype} with the LoRA adapters merged, the trained function up to "
                f"{dtype} rounding, not the original full-precision base plus the adapters.\n")
    if method == "ebft":
        rows += [("alpha (diversity weight, eq. 7)", str(m.alpha)), ("gamma (CE weight)", str(m.gamma)),
                 ("whitening (eqs. 8-9)", str(m.whitening))]
    rows += [("data", _data(settings)), ("learning rate", str(settings.optim.lr)), ("optimizer steps", str(steps)),
             ("seed", str(settings.seed))]
    for name in FINAL_METRICS:
        if name in metrics:
            rows.append((f"final {name}", f"{metrics[name]:.4f}"))
    rows.append(("library", f"ebft {ebft.__version__}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    base = str(settings.model.name)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [{', '.join(sorted({'ebft', method}))}]"] + ([f"base_model: {base}"] if base.count("/") == 1 and
                                            not Path(base).exists() else []) + ["---"]
    return "\n".join(front) + f"""

# {method.upper()} fine-tune of {base}

Fine-tuned with `ebft` (SFT, EBFT: energy-based fine-tuning by feature matching of strided
block-parallel rollouts, paper section 2, or RLVR), method `{method}`.
{note}
| | |
|---|---|
{table}

Reproduce (the resolved config is `{CONFIG}` beside this card):

```bash
{command}
```
"""


def write_card(directory: str | Path, settings: TrainSettings, metrics: dict[str, float], steps: int) -> Path:
    """Write ``README.md`` and ``config.yaml`` (the run's resolved config, ``settings.record``) into the
    saved model's ``directory``; return the card."""
    directory = Path(directory)
    write_text(directory / CONFIG, OmegaConf.to_yaml(OmegaConf.create(dict(settings.record))))
    return write_text(directory / CARD, model_card(settings, metrics, steps, reproduce_command()))


def push(directory: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload the saved model folder (weights or adapter, tokenizer, card, config) to ``repo_id``
    with ``huggingface_hub``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(directory),
                             commit_message=f"Upload {Path(directory).name} (ebft {ebft.__version__})")
    return str(getattr(info, "commit_url", info))
