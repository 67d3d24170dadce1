"""Shared-prefix packing: one packed row per group (or several groups per row), one prompt encoding.

A group is a prompt, the answers ``r+`` (correct) and ``r-`` (rejected), and ``G`` rollouts. CEPO
needs each rollout's response under three contexts (``policy`` = ``[prompt, response]``, ``pos`` =
``[prompt, r+, response]``, ``neg`` = ``[prompt, r-, response]``). Packed, a group is::

    prompt | r+ | r- | y_1 .. y_G (parent prompt) | y_1 .. y_G (parent r+) | y_1 .. y_G (parent r-)

with a segment table (start, length, parent, position offset). Each segment's positions continue
from the end of its parent chain (``pos(r+) = len(prompt)``, ``pos(y under r+) = len(prompt) +
len(r+)``), so with tree attention every token sees exactly the keys and positions it would see in
its own unshared sequence. Groups are laid end to end in rows of at most ``max_row_len`` tokens
(first fit, in order) and rows are right-padded; padding belongs to no segment.

For the update pass pack with ``contexts=("policy",)``: the prompt is shared by the G responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cepo_kernels.tree_attention import TreeLayout

CONTEXTS = ("policy", "pos", "neg")
_PARENT = {"policy": "prompt", "pos": "pos_answer", "neg": "neg_answer"}


@dataclass
class Group:
    """One prompt and its rollouts, as token id lists.

    ``pos_answer`` / ``neg_answer`` are the ``r+`` / ``r-`` token ids (empty when absent: the
    teacher context then equals the policy context). ``responses`` are the G rollouts' tokens.
    """

    prompt: Sequence[int]
    responses: Sequence[Sequence[int]]
    pos_answer: Sequence[int] = ()
    neg_answer: Sequence[int] = ()


@dataclass
class SegmentTable:
    """Packed rows and their segments. ``R`` rows of ``T`` tokens, ``S`` segments per row.

    Attributes:
        input_ids: ``(R, T)`` int64, ``pad_id`` in padding.
        position_ids: ``(R, T)`` int64, ``seg_pos[s] + offset`` inside segment ``s``; 0 in padding.
        seg_start, seg_len, seg_parent, seg_pos: ``(R, S)`` int64; unused slots have length 0,
            parent -1.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    seg_parent: torch.Tensor
    seg_pos: torch.Tensor
    _layout: TreeLayout | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def layout(self) -> TreeLayout:
        """The token-level attention layout (built once, cached)."""
        if self._layout is None or self._layout.device != self.input_ids.device:
            self._layout = TreeLayout(self.seg_start, self.seg_len, self.seg_parent, self.input_ids.shape[1])
        return self._layout

    def to(self, device: torch.device | str) -> SegmentTable:
        return SegmentTable(
            *(t.to(device) for t in (self.input_ids, self.position_ids, self.seg_start, self.seg_len)),
            self.seg_parent.to(device),
            self.seg_pos.to(device),
        )


@dataclass
class ResponseSlot:
    """Where one response (group ``group``, rollout ``rollout``, context ``context``) lies in the pack."""

    group: int
    rollout: int
    context: str
    row: int
    segment: int
    start: int  # packed column of the first response token
    length: int
    prev: int  # packed column of the token that predicts the first response token, -1 if none


@dataclass
class PackedGroups:
    """A :class:`SegmentTable` plus where every response is. Responses are numbered ``n = 0..N-1``
    in input order (group by group, rollout by rollout); ``N = sum_g G_g``."""

    table: SegmentTable
    slots: list[ResponseSlot]
    contexts: tuple[str, ...]
    n_responses: int
    max_response_len: int
    response_ids: list[Sequence[int]]
    group_offsets: list[int]  # response number of each group's first rollout

    def predict_index(self, context: str) -> torch.Tensor:
        """``(N, L)`` int64 flat packed index ``row * T + col`` of the position whose output
        predicts response token ``t`` under ``context`` (the previous token; for ``t = 0`` the last
        token of the parent chain). ``-1`` past the response's end or where nothing precedes it."""
        if context not in self.contexts:
            raise ValueError(f"context: expected one of {self.contexts}, got {context!r}")
        T = self.table.input_ids.shape[1]
        out = torch.full((self.n_responses, self.max_response_len), -1, dtype=torch.long)
        for slot in self.slots:
            if slot.context != context:
                continue
            n = self._index(slot)
            if slot.length == 0:
                continue
            cols = torch.arange(slot.start - 1, slot.start + slot.length - 1)
            cols[0] = slot.prev
            idx = torch.where(cols >= 0, slot.row * T + cols, torch.full_like(cols, -1))
            out[n, : slot.length] = idx
        return out.to(self.table.input_ids.device)

    def targets(self, ignore_index: int = -100) -> torch.Tensor:
        """``(N, L)`` int64 response token ids, ``ignore_index`` past each response's end."""
        out = torch.full((self.n_responses, self.max_response_len), ignore_index, dtype=torch.long)
        for n, ids in enumerate(self.response_ids):
            if len(ids):
                out[n, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        return out.to(self.table.input_ids.device)

    def mask(self) -> torch.Tensor:
        """``(N, L)`` bool, True on real response tokens."""
        lens = torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)
        return (torch.arange(self.max_response_len)[None, :] < lens[:, None]).to(self.table.input_ids.device)

    def _index(self, slot: ResponseSlot) -> int:
        return self.group_offsets[slot.group] + slot.rollout


def _group_segments(group: Group, contexts: Sequence[str]) -> list[tuple[str, int, list[int], str | None, int]]:
    """Segments of one group as ``(kind, rollout, tokens, parent kind, position offset)``."""
    prompt = list(group.prompt)
    segs: list[tuple[str, int, list[int], str | None, int]] = [("prompt", -1, prompt, None, 0)]
    if "pos" in contexts:
        segs.append(("pos_answer", -1, list(group.pos_answer), "prompt", len(prompt)))
    if "neg" in contexts:
        segs.append(("neg_answer", -1, list(group.neg_answer), "prompt", len(prompt)))
    for ctx in contexts:
        parent = _PARENT[ctx]
        offset = (
            len(prompt)
            + {"prompt": 0, "pos_answer": len(group.pos_answer), "neg_answer": len(group.neg_answer)}[parent]
        )
        for i, resp in enumerate(group.responses):
            segs.append((ctx, i, list(resp), parent, offset))
    return segs


def pack_groups(
    groups: Sequence[Group],
    *,
    contexts: Sequence[str] = CONTEXTS,
    max_row_len: int | None = None,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
) -> PackedGroups:
    """Pack ``groups`` into rows of shared-prefix segment trees.

    Args:
        groups: the groups, each with ``G >= 1`` responses (G may differ between groups).
        contexts: which response contexts to include, a subset of ``("policy", "pos", "neg")``
            in any order; ``r+`` / ``r-`` segments are included only for ``pos`` / ``neg``.
        max_row_len: most tokens per row; groups are placed first-fit in order. ``None``: every
            group in one row. A group longer than ``max_row_len`` raises ``ValueError``.
        pad_id: token id of padding.
        pad_to_multiple: round the row length up to a multiple of this.

    Returns:
        :class:`PackedGroups`; ``table.input_ids`` has shape ``(R, T)``.
    """
    contexts = tuple(contexts)
    if not contexts or any(c not in CONTEXTS for c in contexts) or len(set(contexts)) != len(contexts):
        raise ValueError(f"contexts: expected distinct names from {CONTEXTS}, got {contexts}")
    if not groups:
        raise ValueError("groups: expected at least one group")
    per_group = [_group_segments(g, contexts) for g in groups]
    sizes = [sum(len(s[2]) for s in segs) for segs in per_group]
    rows: list[list[int]] = []
    used: list[int] = []
    for gi, size in enumerate(sizes):
        if max_row_len is not None and size > max_row_len:
            raise ValueError(f"max_row_len: group {gi} packs to {size} tokens, more than {max_row_len}")
        for r, u in enumerate(used):
            if max_row_len is None or u + size <= max_row_len:
                rows[r].append(gi)
                used[r] += size
                break
        else:
            rows.append([gi])
            used.append(size)
    T = max(1, max(used))
    T = -(-T // pad_to_multiple) * pad_to_multiple
    S = max(sum(len(per_group[g]) for g in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    seg_start = torch.zeros((R, S), dtype=torch.long)
    seg_len = torch.zeros((R, S), dtype=torch.long)
    seg_parent = torch.full((R, S), -1, dtype=torch.long)
    seg_pos = torch.zeros((R, S), dtype=torch.long)
    slots: list[ResponseSlot] = []
    for r, row in enumerate(rows):
        col, s = 0, 0
        for gi in row:
            index_of: dict[str, int] = {}
            last_col: dict[str, int] = {}  # last token column of each context segment's chain
            for kind, rollout, toks, parent, offset in per_group[gi]:
                n = len(toks)
                seg_start[r, s], seg_len[r, s], seg_pos[r, s] = col, n, offset
                if n:
                    input_ids[r, col : col + n] = torch.as_tensor(toks, dtype=torch.long)
                    position_ids[r, col : col + n] = torch.arange(offset, offset + n)
                if parent is not None:
                    seg_parent[r, s] = index_of[parent]
                if rollout < 0:
                    index_of[kind] = s
                    chain_last = last_col.get(parent, -1) if parent is not None else -1
                    last_col[kind] = col + n - 1 if n else chain_last
                else:
                    slots.append(ResponseSlot(gi, rollout, kind, r, s, col, n, last_col[parent]))
                col += n
                s += 1
    table = SegmentTable(input_ids, position_ids, seg_start, seg_len, seg_parent, seg_pos)
    response_ids = [list(resp) for g in groups for resp in g.responses]
    max_len = max(1, max(len(x) for x in response_ids))
    offsets = [0]
    for g in groups[:-1]:
        offsets.append(offsets[-1] + len(g.responses))
    return PackedGroups(table, slots, contexts, len(response_ids), max_len, response_ids, offsets)


def unshared_sequences(group: Group, context: str) -> list[list[int]]:
    """The plain (unpacked) token sequences of one context: ``[prompt, (r+|r-), response]`` per rollout."""
    mid = {"policy": [], "pos": list(group.pos_answer), "neg": list(group.neg_answer)}[context]
    return [list(group.prompt) + mid + list(resp) for resp in group.responses]
