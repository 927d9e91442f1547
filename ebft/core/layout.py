"""The strided layout: every index map of strided block-parallel rollouts (paper §3, appendix F).

A training row starts with a chunk ``x[0:T]`` of packed text. With first context length ``C``,
stride ``s``, generation length ``G`` and ``n`` samples per context there are

    NB = floor((T - G - C) / s) + 1

blocks. Block ``k`` has the context ``x[0 : C + k*s]`` (a whole prefix of the chunk) and the
ground-truth completion ``x[C + k*s : C + k*s + G]``. All ``n * NB`` sampled completions sit in the
same row after the chunk, step-major (paper appendix F, the interleaving
``[y_{1,0}, y_{2,0}, y_{3,0}, y_{1,1}, ...]``):

    token_index[j, k, g] = T + g*(n*NB) + j*NB + k          (sample j, block k, step g)
    position_ids[token_index[j, k, g]] = C + k*s + g         (the position of the token it replaces)
    score_index[j, k, g] = C + k*s - 1                if g = 0
                         = token_index[j, k, g - 1]  if g >= 1

so a plain shift-by-one is wrong for generated tokens. Attention (paper Figure 10): the chunk is
causal; ``(j, k, g)`` attends to the chunk rows ``< C + k*s`` and to ``(j, k, g')`` for ``g' <= g``.
That rule is stored as two per-row vectors, so one vectorised comparison gives any part of it:

    allowed[q, kv] = kv < row_limit[q]  or  (row_group[q] == row_group[kv] >= 0 and kv <= q)

with ``row_limit`` = ``q + 1`` on chunk rows and ``C + k*s`` on generated rows, and ``row_group`` =
``-1`` on chunk rows and ``j*NB + k`` on generated rows (the rows of one completion increase with g).

Per-(sample, block) quantities — advantages, rewards — live on the grid ``(..., n, NB)``; per-token
quantities on the token grid ``(..., n, NB, G)``, which ``token_index`` and ``score_index`` address
row by row. ``broadcast_to_tokens`` goes from the first to the second, ``grid_to_rows`` from the
token grid to a full row, ``scatter_generated`` builds the row of input ids.
"""

from __future__ import annotations

import copy

import torch

from ebft.config import POOLING   # feature poolings: the last token of a window, or (both means) all its G tokens


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLING:
        raise ValueError(f"pooling='{pooling}' is unknown; use one of {', '.join(POOLING)}")


class StridedLayout:
    """All index tensors of one geometry ``(T, C, s, G, n)``, built once with vectorised ops.

    Tensors live on one device; ``to(device)`` returns a cached copy of the layout on another.
    """

    def __init__(self, seq_len: int, context_len: int, stride: int, gen_len: int, num_samples: int):
        values = {"seq_len T": seq_len, "context_len C": context_len, "stride s": stride,
                  "gen_len G": gen_len, "num_samples n": num_samples}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")
        if seq_len < context_len + gen_len:
            raise ValueError(
                f"seq_len T={seq_len} is too small for context_len C={context_len} + gen_len G={gen_len}: "
                f"no block fits (NB = floor((T - G - C) / s) + 1 < 1); use T >= C + G = "
                f"{context_len + gen_len}, or a smaller C or G")
        T, C, s, G, n = seq_len, context_len, stride, gen_len, num_samples
        self.seq_len, self.context_len, self.stride, self.gen_len, self.num_samples = T, C, s, G, n
        self.num_blocks = NB = (T - G - C) // s + 1
        self.length = T + n * NB * G
        self.device = torch.device("cpu")
        self._copies: dict[torch.device, StridedLayout] = {self.device: self}

        j = torch.arange(n).view(n, 1, 1)
        k = torch.arange(NB).view(1, NB, 1)
        g = torch.arange(G).view(1, 1, G)
        self.context_end = C + torch.arange(NB) * s
        self.gt_index = self.context_end[:, None] + torch.arange(G)
        self.token_index = T + g * (n * NB) + j * NB + k
        first = (self.context_end - 1).view(1, NB, 1).expand(n, NB, 1)
        self.score_index = torch.cat([first, self.token_index[:, :, :-1]], dim=2)

        self.position_ids = torch.arange(self.length)
        self.position_ids[self.token_index] = (self.context_end.view(1, NB, 1) + g).expand(n, NB, G)
        self.row_limit = torch.arange(1, self.length + 1)
        self.row_limit[self.token_index] = self.context_end.view(1, NB, 1).expand(n, NB, G)
        self.row_group = torch.full((self.length,), -1)
        self.row_group[self.token_index] = (j * NB + k).expand(n, NB, G)

    def __repr__(self) -> str:
        return (f"StridedLayout(T={self.seq_len}, C={self.context_len}, s={self.stride}, G={self.gen_len}, "
                f"n={self.num_samples}; NB={self.num_blocks}, length={self.length}, device={self.device})")

    def to(self, device: torch.device | str) -> StridedLayout:
        """This layout with every index tensor on ``device`` (built once per device, then cached)."""
        device = torch.device(device)
        if device not in self._copies:
            moved = copy.copy(self)
            moved.device = device
            for name, value in vars(self).items():
                if isinstance(value, torch.Tensor):
                    setattr(moved, name, value.to(device))
            self._copies[device] = moved
        return self._copies[device]

    def step_rows(self, step: int) -> slice:
        """The rows holding the ``n*NB`` tokens of generation step ``step`` (contiguous, step-major)."""
        if not 0 <= step < self.gen_len:
            raise ValueError(f"step={step} is outside 0..G-1 = 0..{self.gen_len - 1}")
        width = self.num_samples * self.num_blocks
        start = self.seq_len + step * width
        return slice(start, start + width)

    def allowed(self, query_rows: slice | torch.Tensor | None = None, num_keys: int | None = None,
                key_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool attention matrix (True = may attend) for ``query_rows`` x the first ``num_keys`` rows
        (or x the rows ``key_rows`` lists, in its order).

        Defaults give the full ``(length, length)`` matrix. The incremental mask of sampling step g is
        ``allowed(step_rows(g), step_rows(g).stop)``: the keys a KV cache holds after feeding step g.
        """
        rows = torch.arange(self.length, device=self.device)
        q = rows if query_rows is None else rows[query_rows]
        kv = rows[: self.length if num_keys is None else num_keys] if key_rows is None else key_rows
        limit, group = self.row_limit[q][:, None], self.row_group[q][:, None]
        return (kv[None, :] < limit) | ((group == self.row_group[kv][None, :]) & (group >= 0) & (kv[None, :] <= q[:, None]))

    def gt_feature_index(self, pooling: str) -> torch.Tensor:
        """Chunk rows pooled into ground-truth features: ``(NB,)`` for last_token, ``(NB, G)`` for mean."""
        _check_pooling(pooling)
        return self.gt_index[:, -1] if pooling == "last_token" else self.gt_index

    def gen_feature_index(self, pooling: str) -> torch.Tensor:
        """Rows pooled into generated features: ``(n, NB)`` for last_token, ``(n, NB, G)`` for mean."""
        _check_pooling(pooling)
        return self.token_index[:, :, -1] if pooling == "last_token" else self.token_index

    def broadcast_to_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-(sample, block) values ``(..., n, NB)`` -> the token grid ``(..., n, NB, G)`` (a view).

        Entry ``[..., j, k, g]`` is the value of ``(j, k)`` and belongs to row ``token_index[j, k, g]``;
        ``grid_to_rows`` places a grid in the row when a row-shaped tensor is needed.
        """
        self._check_grid(values, extra=0)
        return values.unsqueeze(-1).expand(*values.shape, self.gen_len)

    def grid_to_rows(self, grid: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Token grid ``(..., n, NB, G)`` -> row ``(..., length)``: ``row[token_index] = grid``, chunk rows = fill."""
        self._check_grid(grid, extra=1)
        step_major = grid.movedim(-1, -3).flatten(-3)
        chunk = torch.full((*grid.shape[:-3], self.seq_len), fill, dtype=grid.dtype, device=grid.device)
        return torch.cat([chunk, step_major], dim=-1)

    def scatter_generated(self, chunk_ids: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The row of input ids ``(batch, length)`` from the chunk ``(batch, T)`` and tokens ``(batch, n, NB, G)``."""
        if chunk_ids.dim() != 2 or chunk_ids.shape[1] != self.seq_len:
            raise ValueError(f"chunk_ids has shape {tuple(chunk_ids.shape)}; expected (batch, T={self.seq_len})")
        if generated.dim() != 4 or generated.shape[0] != chunk_ids.shape[0]:
            raise ValueError(f"generated has shape {tuple(generated.shape)}; expected (batch={chunk_ids.shape[0]}, "
                             f"n={self.num_samples}, NB={self.num_blocks}, G={self.gen_len})")
        row = self.grid_to_rows(generated.to(chunk_ids.dtype))
        row[:, : self.seq_len] = chunk_ids
        return row

    def _check_grid(self, tensor: torch.Tensor, extra: int) -> None:
        expected = (self.num_samples, self.num_blocks, self.gen_len)[: 2 + extra]
        if tensor.dim() < len(expected) or tuple(tensor.shape[-len(expected):]) != expected:
            names = "(..., n, NB, G)" if extra else "(..., n, NB)"
            raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not end with {names} = {expected}")
