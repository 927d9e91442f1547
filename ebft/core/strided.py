"""THE strided forward: one pass of a model over strided rows (``ebft.core.layout``) with the layout's
positions and attention rule. The generator's loss (``ebft.objectives.ebft_update``), the feature
network (``ebft.models.features``) and the uncached sampler oracle all call it; only the KV-cached
sampler (``ebft.rollout.sampler``), which feeds the row in steps, builds its own step masks.
"""

from __future__ import annotations

import torch
from torch import nn

from ebft.core.compat import attn_implementation, backbone_forward, check_strided, param_dtype
from ebft.core.documents import StridedDocuments
from ebft.core.layout import StridedLayout
from ebft.core.masks import document_mask, strided_mask


def strided_hidden(model: nn.Module, row: torch.Tensor, layout: StridedLayout,
                   documents: StridedDocuments | None = None) -> torch.Tensor:
    """Final hidden states (batch, length, H) of ``model``'s backbone over strided rows ``row`` (batch,
    length = ``layout.length``), in one pass: the model is checked against the strided rule
    (``check_strided``), the layout moved to the row's device, and the mask built for the model's
    attention implementation. With ``documents`` (``ebft.core.documents``: document masking) the mask
    and the position ids are the batch's own."""
    if row.dim() != 2 or row.shape[1] != layout.length:
        raise ValueError(f"row has shape {tuple(row.shape)}; expected (batch, length={layout.length}) for {layout} "
                         "(build it with layout.scatter_generated)")
    check_strided(model, layout.seq_len)
    layout = layout.to(row.device)
    impl, dtype = attn_implementation(model), param_dtype(model)
    if documents is None:
        mask, positions = strided_mask(layout, impl, dtype), layout.position_ids
    else:
        mask, positions = document_mask(documents, impl, dtype), documents.position_ids
    hidden, _ = backbone_forward(model, row, positions, mask)
    return hidden
