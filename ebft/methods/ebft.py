"""Energy-based fine-tuning (paper §2, Algorithm 1): the LightningModule.

``training_step`` on a micro-batch of chunks ``x`` (batch, T) reads in the paper's four steps:

1. sample ``n`` completions of ``G`` tokens for every context ``x[0:C+k*s]`` with the
   KV-cached strided sampler (no grad, eval mode; ``ebft.rollout.sampler``);
2. one no-grad pass of the frozen feature network over the strided row gives
   ``phi(c_k : y_hat_jk)`` and ``phi(c_k : y_k)`` for all blocks (paper eq. 4);
3. rewards ``r_j = AT_j - alpha * DT_j`` (eqs. 7, 9, 67) and the corrected RLOO baseline (eq. 94;
   ``method.baseline`` picks another) give advantages ``A_jk = r_jk - b_jk``;
4. ONE forward+backward of the generator over the strided row gives the loss
   ``rl_coef * PG(-A log p) + gamma * CE`` (token mean, as the authors' code: docs/authors_code.md).

Steps 3-4 are :func:`ebft.objectives.ebft_update.ebft_update`, a pure function of the rollouts and
their features, which ``bench/step_cost.py`` times.

``method.anchors=answer`` keeps the block grid and trains only on the answer blocks of each chunk
(``ebft.core.anchors``: ground truth inside one example's answer, its whole prompt in the context); the
other blocks are still sampled (the shapes never change) but get no reward, advantage or weight.
"""

from __future__ import annotations

import logging
import time

import torch

from ebft.config import ConfigError, TrainSettings
from ebft.core.anchors import anchored_blocks, answer_tokens
from ebft.core.documents import StridedDocuments
from ebft.core.layout import StridedLayout
from ebft.data.formats import chat_turns
from ebft.methods.base import FineTuneModule, generator_source
from ebft.models.features import build_feature_network
from ebft.models.loading import resolve_dtype
from ebft.objectives.ebft_update import ebft_update
from ebft.rollout.sampler import sample_strided

log = logging.getLogger(__name__)


class EBFTModule(FineTuneModule):
    strided_rows = True

    def __init__(self, settings: TrainSettings, tokenizer):
        super().__init__(settings, tokenizer)
        self.method = m = settings.method
        self.layout = StridedLayout(*settings.task.geometry, m.sampling.num_samples)
        model, device = settings.model, settings.device
        base_weights = generator_source(model) == model.name   # phi is the BASE model (paper §2), also for warm starts
        self.feature_network = build_feature_network(
            settings.feature_network, model.name, resolve_dtype(model.dtype, device), device,
            model.attn_implementation, generator=self.generator if base_weights else None,
            adapters=self.base_adapters, quantization=model.quantization)

    @classmethod
    def check_data(cls, settings: TrainSettings, datamodule) -> None:
        """Answer anchors need examples with a prompt, and at least one answer block in the training
        chunks (``ebft.core.anchors``); the fraction of blocks used is logged."""
        m = settings.method
        if m.anchors == "all":
            return
        if not any(chat_turns(row) is not None for row in datamodule.train_rows):
            raise ConfigError("method.anchors=answer needs examples with a prompt and an answer (prompt/completion, "
                              "question/answer or chat rows), but every training row is plain text (all of it is "
                              "answer, there is no prompt to hold in a context); use method.anchors=all")
        layout = StridedLayout(*settings.task.geometry, m.sampling.num_samples)
        used = anchored_blocks(layout, vars(datamodule.train_chunks), m.anchors, m.min_answer_prefix, m.answer_turns)
        if not used.any():
            raise ConfigError(
                f"method.anchors=answer leaves no block in any of the {len(used)} training chunks: no G={layout.gen_len} "
                f"ground-truth tokens lie in one answer after method.min_answer_prefix={m.min_answer_prefix} answer tokens "
                f"with the example's whole prompt in the chunk; lower method.min_answer_prefix or task.gen_len, start "
                "every chunk at an example (data.packing=examples), or raise task.seq_len so that whole examples fit")
        log.info("method.anchors=answer: %d of %d blocks of the training chunks are used (%.1f%%)",
                 int(used.sum()), used.numel(), 100 * used.float().mean().item())

    def rollout(self, ids: torch.Tensor, batch_idx: int, documents: StridedDocuments | None = None) -> torch.Tensor:
        """Sampled tokens (batch, n, NB, G) from the current policy (within ``documents`` when given)."""
        s = self.method.sampling
        return sample_strided(self.generator, ids, self.layout, temperature=s.temperature, top_p=s.top_p,
                              generator=self.sampling_generator(batch_idx), documents=documents)

    def training_step(self, batch, batch_idx):
        ids, m = batch["input_ids"], self.method
        layout = self.layout.to(ids.device)
        used = anchored_blocks(layout, batch, m.anchors, m.min_answer_prefix, m.answer_turns)   # (B, NB) or None
        doc_ids = self.doc_ids(batch)
        docs = None if doc_ids is None else StridedDocuments(layout, doc_ids)
        t0 = time.perf_counter()
        # 1. n samples of G tokens for every context, written into the strided row after the chunk
        tokens = self.rollout(ids, batch_idx, docs)                                  # (B, n, NB, G)
        row = layout.scatter_generated(ids, tokens)                                  # (B, T + n*NB*G)
        t1 = time.perf_counter()
        # 2. features of the generated and ground-truth windows (frozen feature network, one pass)
        gen_f, gt_f = self.feature_network.strided_features(row, layout, docs)      # (B, NB, n, D), (B, NB, D)
        t2 = time.perf_counter()
        # 3-4. rewards, advantages and the loss from one forward of the generator (backward: Lightning)
        loss, stats = ebft_update(self.generator, layout, row, tokens, gen_f, gt_f, m,
                                  answer_tokens(batch, m.answer_turns), used, docs)
        bs = ids.shape[0]
        self.log_dict({**stats.metrics(), "perf/sample_s": t1 - t0, "perf/features_s": t2 - t1,
                       "perf/rollout_tokens_per_s": tokens.numel() / max(t1 - t0, 1e-9)}, batch_size=bs)
        self.log("train/reward_mean", stats.rewards.reward.mean(), prog_bar=True, batch_size=bs, logger=False)
        return loss
