"""LightningDataModules: packed chunks (SFT, EBFT) or prompts (RLVR) for training, the packed held-out
chunks for validation, both sides from the one held-out pipeline (``ebft.data.heldout``).

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

from ebft.config import DataSettings, PromptSettings
from ebft.data.heldout import CHUNKS, PROMPTS, split_data
from ebft.data.packing import PackedChunks
from ebft.data.prompts import PromptDataset, left_pad_collate

log = logging.getLogger(__name__)


class ChunkDataset(Dataset):
    """Indexable view of packed chunks: each item is a dict of every field (``PackedChunks.item``)."""

    def __init__(self, chunks: PackedChunks):
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return self.chunks.item(i)


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


class HeldOutDataModule(L.LightningDataModule):
    """What both kinds of training data share: the packed held-out chunks for validation, and the
    resumable, rank-sharded training order of ``batch_size`` items per device (seed ``seed``).
    Subclasses say what a training item is (a chunk or a prompt)."""

    def __init__(self, data: DataSettings, tokenizer, seq_len: int, batch_size: int, seed: int):
        super().__init__()
        self.data, self.tokenizer, self.seq_len = data, tokenizer, seq_len
        self.batch_size, self.seed = batch_size, seed
        self.val_chunks: PackedChunks | None = None
        self.val_rows: list[dict] = []

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

    def training_order(self, size: int) -> ResumableBatchSampler:
        """This rank's batches of ``size`` training items, resuming where the optimizer steps stand."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ResumableBatchSampler(size, self.batch_size, self.seed, rank, world,
                                     self.position if trainer else None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ChunkDataset(self.val_chunks), batch_size=self.batch_size, shuffle=False)


class ChunkDataModule(HeldOutDataModule):
    """Rows -> held-out split -> packed chunks of ``seq_len`` tokens (T), in training batches of
    ``batch_size`` chunks per device, in the order of ``seed``."""

    def __init__(self, data: DataSettings, tokenizer, seq_len: int, batch_size: int, seed: int):
        super().__init__(data, tokenizer, seq_len, batch_size, seed)
        self.train_chunks: PackedChunks | None = None
        self.train_rows: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_chunks is not None:
            return
        split = split_data(self.data, self.tokenizer, self.seq_len, train=CHUNKS, val=CHUNKS)
        self.train_chunks, self.val_chunks, self.val_rows = split.train, split.val, split.val_rows
        self.train_rows = split.train_rows
        log.info("data: %d train rows -> %d chunks, %d held-out rows -> %d chunks of %d tokens",
                 len(split.train_rows), len(self.train_chunks.input_ids), len(self.val_rows),
                 len(self.val_chunks.input_ids), self.seq_len)

    def first_trained(self, count: int) -> PackedChunks:
        """The first ``count`` training chunks in the order the run trains on them (all ranks' shares of
        the first global batches): the in-sample set whose CFM the calibration callback follows."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        size = len(self.train_chunks.input_ids)
        order = ResumableBatchSampler(size, self.batch_size * world, self.seed)
        picked = [i for batch in itertools.islice(iter(order), -(-min(count, size) // (self.batch_size * world)))
                  for i in batch][:count]
        return self.train_chunks.select(torch.tensor(picked))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ChunkDataset(self.train_chunks),
                          batch_sampler=self.training_order(len(self.train_chunks.input_ids)))


class PromptDataModule(HeldOutDataModule):
    """Training: batches of ``batch_size`` prompts (resumable, sharded by rank, as the chunk data), the
    training rows that ``prompts`` selects (``ebft.data.prompts``); validation: the packed held-out
    chunks. It has no training chunks, so no in-sample CFM set (``first_trained``)."""

    def __init__(self, data: DataSettings, tokenizer, seq_len: int, batch_size: int, seed: int,
                 prompts: PromptSettings):
        super().__init__(data, tokenizer, seq_len, batch_size, seed)
        self.prompt_settings = prompts
        self.prompts: PromptDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.prompts is not None:
            return
        split = split_data(self.data, self.tokenizer, self.seq_len, train=PROMPTS, val=CHUNKS,
                           prompts=self.prompt_settings)
        self.val_chunks, self.val_rows = split.val, split.val_rows
        self.prompts = PromptDataset(split.train.rows, split.train.ids)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_sampler=self.training_order(len(self.prompts)),
                          collate_fn=left_pad_collate(self.tokenizer.pad_token_id))
