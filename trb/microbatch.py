"""Token-budget micro-batches: the bound on every non-decoding forward (teacher scoring, the
student's forward + backward).

A batch of finished sequences (left-padded prompts [B, P], right-padded completions [B, T]) is
split into groups of rows whose padded size rows x width stays within `train.micro_batch_tokens`
(rows sorted by length first, so rows of similar lengths share a group and padding stays small).
Each group is re-laid out *right-padded*: row i is its p_i prompt tokens, its r_i completion
tokens, then padding up to the group's longest row. Under a causal mask the padding only follows
valid tokens, so no attention mask is needed at all (no [rows, L, L] mask is built) and
positions are 0, 1, 2, ...; the hidden state predicting completion token j of row i sits at
column p_i - 1 + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    """Finished sequences: the part of a `Rollout` the loss needs (also SFT's teacher samples)."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, T] completions, right-padded
    response_mask: torch.Tensor  # [B, T] bool, a prefix of each row

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


@dataclass
class MicroBatch:
    """A group of rows of a `Sequences`, right-padded (see the module docstring)."""

    ids: torch.Tensor  # [b, L]
    hidden_index: torch.Tensor  # [N] flat index into [b * L] of the states predicting each completion token
    rows: torch.Tensor  # [N] the completion tokens' coordinates in the Sequences' [B, T] arrays
    cols: torch.Tensor  # [N]
    weight: float = 1.0  # 0 for a padding micro-batch (a rank with fewer groups than another)

    @property
    def num_tokens(self) -> int:
        return int(self.rows.numel())

    @property
    def padded_tokens(self) -> int:
        return self.ids.numel()


def group_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices grouped so that len(group) x max length in the group <= budget (a row longer than
    the budget alone); rows in decreasing length, so each group's rows have similar lengths.
    budget <= 0: one group of every row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if budget <= 0:
        return [order] if order else []
    groups: list[list[int]] = []
    for i in order:  # lengths decrease, so the group's width is its first row's length
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pack(seqs: Sequences, rows: list[int], pad_id: int, weight: float = 1.0) -> MicroBatch:
    """Rows `rows` of `seqs` as one right-padded micro-batch."""
    dev = seqs.tokens.device
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    pm, rm = seqs.prompt_mask[idx].bool(), seqs.response_mask[idx]
    p_len, r_len = pm.sum(1), rm.sum(1)
    width = int((p_len + r_len).max())
    big_p = seqs.prompt_ids.shape[1]
    col = torch.arange(width, device=dev)[None, :]
    in_prompt = col < p_len[:, None]
    in_resp = (col >= p_len[:, None]) & (col < (p_len + r_len)[:, None])
    p_src = (big_p - p_len[:, None] + col).clamp(0, big_p - 1)
    r_src = (col - p_len[:, None]).clamp(0, max(seqs.tokens.shape[1] - 1, 0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=dev)
    ids = torch.where(in_prompt, seqs.prompt_ids[idx].gather(1, p_src), ids)
    if seqs.tokens.shape[1]:
        ids = torch.where(in_resp, seqs.tokens[idx].gather(1, r_src), ids)
    local, cols = rm.nonzero(as_tuple=True)  # row-major, like response_mask[rows] indexing
    hidden_index = local * width + p_len[local] - 1 + cols
    return MicroBatch(ids=ids, hidden_index=hidden_index, rows=idx[local], cols=cols, weight=weight)


def _lengths(seqs: Sequences) -> list[int]:
    """Each row's prompt + completion tokens."""
    return (seqs.prompt_mask.bool().sum(1) + seqs.response_mask.sum(1)).tolist()


def split(seqs: Sequences, budget: int, pad_id: int) -> list[MicroBatch]:
    """`seqs` as micro-batches of at most `budget` padded tokens each (0: one micro-batch)."""
    return [pack(seqs, g, pad_id) for g in group_rows(_lengths(seqs), budget)]


def filler(seqs: Sequences, pad_id: int) -> MicroBatch:
    """A zero-weight micro-batch of the shortest row: under FSDP2 every rank must run as many
    forwards as the rank with the most micro-batches."""
    lengths = _lengths(seqs)
    return pack(seqs, [min(range(len(lengths)), key=lengths.__getitem__)], pad_id, weight=0.0)


def response_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states predicting each completion token of `mb`: [N, H]. A non-decoding
    forward: no KV cache, no attention mask (causal, right padding)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=mb.ids, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[mb.hidden_index]
