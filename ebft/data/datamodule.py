"""LightningDataModule serving packed chunks (SFT, EBFT) with a held-out split.

Training order is a seeded permutation per epoch (a new one every epoch), sharded by rank, and it
is resumable: each epoch's iteration starts at the batch the optimizer steps taken so far have
reached, so a run resumed from a mid-epoch checkpoint sees exactly the batches an uninterrupted
run would have seen, in step- and epoch-bounded runs, with or without gradient accumulation.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ebft.data.packing import PackedChunks, pack_rows
from ebft.data.sources import load_rows, train_val_split

log = logging.getLogger(__name__)


class ChunkDataset(Dataset):
    """Indexable view of packed chunks: each item is ``{input_ids, answer_mask}``."""

    def __init__(self, chunks: PackedChunks):
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.chunks.input_ids[i], "answer_mask": self.chunks.answer_mask[i]}


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a seeded per-epoch permutation, sharded over ranks, resumable mid-epoch.

    Epoch ``e`` visits the chunks in the order ``torch.randperm(size)`` drawn with seed ``seed + e``
    (a new order every epoch), in ``per_epoch = size // (batch_size * world_size)`` global batches;
    each rank takes every ``world_size``-th index of a global batch, so all ranks run the same
    number of steps, and the incomplete trailing batch is dropped. ``len()`` is always
    ``per_epoch``.

    Where an iteration starts is asked when it starts (not when the sampler is built):
    ``position(per_epoch)`` gives ``(epoch, first batch)``; without it, successive iterations are
    epochs 0, 1, 2, ... from their first batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 position: Callable[[int], tuple[int, int]] | None = None):
        global_batch = batch_size * world_size
        if size < global_batch:
            raise ValueError(
                f"only {size} training chunks for a global batch of {global_batch} "
                f"(batch_size={batch_size} x {world_size} devices): lower method.batch_size or add data")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self.per_epoch = size // global_batch
        self._epochs_started = 0

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        if self.position is None:
            epoch, first = self._epochs_started, 0
        else:
            epoch, first = self.position(self.per_epoch)
        self._epochs_started = epoch + 1
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        global_batch = self.batch_size * self.world_size
        for b in range(first, self.per_epoch):
            ids = order[b * global_batch:(b + 1) * global_batch]
            yield ids[self.rank::self.world_size].tolist()


class ChunkDataModule(L.LightningDataModule):
    """Rows -> held-out split -> packed chunks of ``task.seq_len`` tokens."""

    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.batch_size = int(cfg.method.batch_size)
        self.train_chunks: PackedChunks | None = None
        self.val_chunks: PackedChunks | None = None
        self.val_rows: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_chunks is not None:
            return
        rows = load_rows(self.cfg.data, self.cfg.task.name)
        train_rows, self.val_rows = train_val_split(rows, int(self.cfg.data.val_size), int(self.cfg.data.seed))
        seq_len, template = int(self.cfg.task.seq_len), bool(self.cfg.data.get("chat_template", False))
        self.train_chunks = pack_rows(train_rows, self.tokenizer, seq_len, chat_template=template)
        self.val_chunks = pack_rows(self.val_rows, self.tokenizer, seq_len, chat_template=template)
        log.info("data: %d train rows -> %d chunks, %d held-out rows -> %d chunks of %d tokens",
                 len(train_rows), len(self.train_chunks.input_ids), len(self.val_rows),
                 len(self.val_chunks.input_ids), seq_len)

    def first_trained(self, count: int) -> PackedChunks:
        """The first ``count`` training chunks in the order the run trains on them (all ranks' shares of
        the first global batches): the in-sample set whose CFM the calibration callback follows."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        size = len(self.train_chunks.input_ids)
        order = ResumableBatchSampler(size, self.batch_size * world, int(self.cfg.seed))
        picked = [i for batch in itertools.islice(iter(order), -(-min(count, size) // (self.batch_size * world)))
                  for i in batch][:count]
        idx = torch.tensor(picked)
        return PackedChunks(self.train_chunks.input_ids[idx], self.train_chunks.answer_mask[idx],
                            self.train_chunks.doc_ids[idx])

    def position(self, per_epoch: int) -> tuple[int, int]:
        """``(epoch, first batch)`` where training stands: the optimizer steps taken, in batches.

        An epoch of ``per_epoch`` batches takes ``ceil(per_epoch / accumulate)`` optimizer steps
        (Lightning also steps on an epoch's last batch when its accumulation window is not full), so
        after ``s`` steps training is at batch ``(s mod steps_per_epoch) * accumulate`` of epoch
        ``s // steps_per_epoch``. The sampler asks when an epoch's first batch is drawn, after a resumed
        run's step counter is restored (Lightning may build the loader before that, to count the
        steps of an epoch-bounded run).
        """
        trainer = self.trainer
        accumulate = int(trainer.accumulate_grad_batches)
        epoch, step = divmod(int(trainer.global_step), math.ceil(per_epoch / accumulate))
        return epoch, step * accumulate

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableBatchSampler(len(self.train_chunks.input_ids), self.batch_size,
                                        int(self.cfg.seed), rank, world, self.position if trainer else None)
        return DataLoader(ChunkDataset(self.train_chunks), batch_sampler=sampler,
                          num_workers=int(self.cfg.data.get("num_workers", 0)))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ChunkDataset(self.val_chunks), batch_size=self.batch_size, shuffle=False)
