#!/usr/bin/env python
"""The application's EBFT step against the bare update at the known-answer bench's size (a benchmark).

Both sides run the same update on the same model and batch (a 2-layer hidden-32 Llama over 12
symbols + EOS, chunks of T = 32, C = s = 4, G = 8, n = 4, 16 chunks per step, one thread):

- ``application``: ``EBFTModule.training_step`` under a Lightning ``Trainer`` (its loop, logging,
  optimizer and hooks), as ``python train.py`` runs it, timed per step after warm-up (the process
  start and data loading are extra: ``--startup`` times ``python train.py --help`` too);
- ``bare``: the harness of ``experiments/synthetic`` (``harness.ebft_step``: the sampler, the feature
  pass, ``ebft_update``, backward, AdamW) in a plain loop.

Prints the seconds per step of each and ``application_over_bare=<ratio>`` last.

    python bench/synthetic_step.py --steps 30
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebft.config import compose_config, train_settings  # noqa: E402
from ebft.data.synthetic import make_process  # noqa: E402
from ebft.methods.ebft import EBFTModule  # noqa: E402
from ebft.models.features import FeatureNetwork  # noqa: E402
from ebft.models.loading import build_tiny_model, load_tokenizer  # noqa: E402
from experiments.synthetic.harness import ebft_step  # noqa: E402

OVERRIDES = ["method=ebft", "model=tiny", "task.seq_len=32", "task.context_len=4", "task.stride=4", "task.gen_len=8",
             "method.num_samples=4", "method.temperature=1.0", "method.whitening=none", "alpha=1.0", "gamma=0.1",
             "method.lr=1e-3", "method.warmup_ratio=0", "feature_network.layers=[1.0]",
             "feature_network.pooling=mean_raw", "output_dir=unused"]


class Batches(torch.utils.data.Dataset):
    def __init__(self, chunks: torch.Tensor, batch: int):
        self.chunks, self.batch = chunks, batch

    def __len__(self):
        return len(self.chunks) // self.batch

    def __getitem__(self, i):
        ids = self.chunks[i * self.batch:(i + 1) * self.batch]
        return {"input_ids": ids, "answer_mask": torch.ones_like(ids, dtype=torch.bool)}


class StepClock(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def models(vocab: int):
    generator = build_tiny_model(vocab_size=vocab + 1, num_layers=2, hidden=32, seed=0)
    return generator, FeatureNetwork(copy.deepcopy(generator), layers=(1.0,), pooling="mean_raw")


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--startup", action="store_true", help="also time starting `python train.py --help`")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    process = make_process(vocab=12, regimes=1, states=3, stay=0.85, concentration=0.4, seed=11)
    chunks = torch.from_numpy(process.sample(16 * (args.steps + args.warmup), 32, np.random.default_rng(0))[0])

    settings = train_settings(compose_config("train", OVERRIDES))
    module = EBFTModule(settings, load_tokenizer("tiny"))
    module.generator, module.feature_network = models(process.vocab)
    clock = StepClock()
    trainer = L.Trainer(max_steps=args.steps + args.warmup, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accelerator="cpu", devices=1, callbacks=[clock])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Batches(chunks, 16), batch_size=None))
    application = float(np.median(clock.times[args.warmup:]))

    generator, feature_network = models(process.vocab)
    opt = torch.optim.AdamW(generator.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng, times = torch.Generator().manual_seed(0), []
    generator.train()
    for i in range(args.steps + args.warmup):
        start = time.perf_counter()
        ebft_step(generator, opt, chunks[i * 16:(i + 1) * 16], feature_network, module.layout, module.method, rng)
        times.append(time.perf_counter() - start)
    bare = float(np.median(times[args.warmup:]))

    print(f"application (EBFTModule.training_step under Lightning): {application:.4f} s per step")
    print(f"bare (the harness's ebft_step):                         {bare:.4f} s per step")
    if args.startup:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--help"],
                       capture_output=True, check=True)
        print(f"starting python train.py (--help, imports and Hydra):   {time.perf_counter() - start:.1f} s")
    ratio = application / bare
    print(f"application_over_bare={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
