"""The training order: a new seeded permutation every epoch, and a resumed run trains on exactly the
batches an uninterrupted one would have, in step- and epoch-bounded runs, with and without gradient
accumulation (a real Lightning Trainer over the real datamodule)."""

import itertools
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ebft.config import DataSettings
from ebft.data.datamodule import ChunkDataModule, ResumableBatchSampler
from ebft.data.packing import PackedChunks

SIZE, BATCH = 15, 2  # 7 batches an epoch, one chunk left over


def _epochs(count: int) -> list[list[int]]:
    """The batches of epochs 0, 1, ... of seed 3: each epoch its own permutation, cut into batches."""
    return [order[i:i + BATCH] for e in range(count)
            for order in [torch.randperm(SIZE, generator=torch.Generator().manual_seed(3 + e)).tolist()]
            for i in range(0, SIZE - SIZE % BATCH, BATCH)]


def test_every_epoch_is_a_new_permutation():
    """Lightning takes len() batches per epoch and then iterates again: each iteration is the next epoch."""
    sampler = ResumableBatchSampler(SIZE, BATCH, seed=3)
    epochs = [list(itertools.islice(iter(sampler), len(sampler))) for _ in range(3)]
    assert len(sampler) == 7 and sum(epochs, []) == _epochs(3)
    assert len({tuple(sorted(sum(e, []))) for e in epochs}) == 3  # each epoch leaves another chunk out


def test_ranks_share_each_global_batch():
    ranks = [ResumableBatchSampler(SIZE, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    order = torch.randperm(SIZE, generator=torch.Generator().manual_seed(3)).tolist()
    for b, (left, right) in enumerate(zip(*ranks)):
        assert left == order[6 * b:6 * b + 6:2] and right == order[6 * b + 1:6 * b + 6:2]


# --------------------------------------------------------------------------- with a real Trainer


class Recorder(L.LightningModule):
    """A one-parameter model that records the chunks of every batch it trains on. Like the project's
    methods it sizes its LR schedule with ``estimated_stepping_batches`` (which builds the loader early)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].tolist())
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (total + 1))}


class Crash(RuntimeError):
    pass


class CrashAfter(Callback):
    """Stops the run right after optimizer step ``step`` (and its checkpoint) completed."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Crash


def _datamodule() -> ChunkDataModule:
    dm = ChunkDataModule(DataSettings("qa_code", {}), tokenizer=None, seq_len=1, batch_size=BATCH, seed=3)
    ids = torch.arange(SIZE).unsqueeze(1)  # chunk i holds token i, so a batch names its chunks
    answers = torch.ones_like(ids, dtype=torch.bool)
    dm.train_chunks = PackedChunks(ids, answers, torch.zeros_like(ids), torch.zeros_like(ids), answers)
    return dm


def _fit(tmp_path, bound: dict, accumulate: int, crash: int | None = None, resume: bool = False) -> list:
    module = Recorder()
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, accumulate_grad_batches=accumulate,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0,
                                                   every_n_train_steps=1),
                                   *([CrashAfter(crash)] if crash is not None else [])], **bound)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(module, datamodule=_datamodule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt" if resume else None)
        except Crash:
            pass
    return module.seen


# An epoch is 7 batches: with accumulate=3 that is steps of 3, 3 and 1 batches (the last window partial).
@pytest.mark.parametrize("bound,accumulate,batches,crashes", [
    ({"max_epochs": 3, "max_steps": -1}, 1, 21, (3, 7, 10, 16)),
    ({"max_epochs": 3, "max_steps": -1}, 3, 21, (1, 3, 4, 8)),
    ({"max_epochs": -1, "max_steps": 17}, 1, 17, (5, 14)),
    ({"max_epochs": -1, "max_steps": 8}, 3, 20, (2, 6)),
], ids=["epochs", "epochs-accumulate", "steps", "steps-accumulate"])
def test_resumed_runs_train_on_the_uninterrupted_batches(tmp_path, bound, accumulate, batches, crashes):
    full = _fit(tmp_path / "full", bound, accumulate)
    assert full == _epochs(3)[:batches]
    for crash in crashes:
        run = tmp_path / f"crash{crash}"
        before = _fit(run, bound, accumulate, crash=crash)
        after = _fit(run, bound, accumulate, resume=True)
        epoch, step = divmod(crash, -(-7 // accumulate))
        assert len(before) == 7 * epoch + step * accumulate, f"crash after step {crash}"
        assert before + after == full, f"crash after step {crash}"
