"""Supervised fine-tuning: next-token cross-entropy on packed chunks.

``method.loss_on=answer`` (default, the paper's main text) counts only answer
tokens as targets; ``all`` trains on every token of the chunk. With
``data.document_mask=true`` each example attends only to itself.
"""

from __future__ import annotations

from ebft.methods.base import FineTuneModule


class SFTModule(FineTuneModule):
    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        mask = batch["answer_mask"] if self.settings.method.loss_on == "answer" else None
        loss = self.chunk_ce(ids, mask, self.doc_ids(batch))
        self.log("train/ce", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss
