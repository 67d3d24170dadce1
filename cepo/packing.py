"""Shared-prefix packing: one packed row per group (or several groups per row), one prompt encoding.

A group is a prompt, the answers ``r+`` (correct) and ``r-`` (rejected), and ``G`` rollouts. CEPO
needs each rollout's response under three contexts (``policy`` = ``[prompt, response]``, ``pos`` =
``[prompt, r+, response]``, ``neg`` = ``[prompt, r-, response]``). Packed, a group is::

    prompt | r+ | r- | y_1 .. y_G (parent prompt) | y_1 .. y_G (parent r+) | y_1 .. y_G (parent r-)

with a segment table (start, length, parent, position offset). Each segment's positions continue
from the end of its parent chain (``pos(r+) = len(prompt)``, ``pos(y under r+) = len(prompt) +
len(r+)``), so with tree attention every token sees exactly the keys and positions it would see in
its own unshared sequence. The groups of a micro-batch are laid end to end in one row, with no
padding (each segment attends only to its own window, so the row's length costs nothing).

A group may carry fewer contexts than the pack (``Group.contexts``): a CEPO group without a usable
``r-`` packs only ``policy`` and ``pos``. For the update pass pack with ``contexts=("policy",)``:
the prompt is shared by the G responses.

Packing builds plain Python lists once and converts each table with one ``torch.tensor`` call;
the per-token index tables (:meth:`PackedGroups.predict_index`) are computed with tensor ops from
per-response arrays, with no Python loop over responses.
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
    ``contexts``: the contexts packed for this group (a subset of the pack's); None packs all.
    """

    prompt: Sequence[int]
    responses: Sequence[Sequence[int]]
    pos_answer: Sequence[int] = ()
    neg_answer: Sequence[int] = ()
    contexts: tuple[str, ...] | None = None

    def packed_size(self, contexts: Sequence[str] = CONTEXTS) -> int:
        """Tokens this group occupies in a pack with ``contexts``."""
        ctx = self.contexts_in(contexts)
        resp = sum(len(r) for r in self.responses)
        return (
            len(self.prompt)
            + (len(self.pos_answer) if "pos" in ctx else 0)
            + (len(self.neg_answer) if "neg" in ctx else 0)
            + resp * len(ctx)
        )

    def contexts_in(self, contexts: Sequence[str]) -> tuple[str, ...]:
        if self.contexts is None:
            return tuple(contexts)
        return tuple(c for c in contexts if c in self.contexts)


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
class PackedGroups:
    """A :class:`SegmentTable` plus where every response is. Responses are numbered ``n = 0..N-1``
    in input order (group by group, rollout by rollout); ``N = sum_g G_g``.

    Per packed response copy ``i`` (one per response and context present), ``slot_*`` are ``(M,)``
    int64 tensors: ``slot_ctx`` (index into ``contexts``), ``slot_n`` (response number),
    ``slot_row``, ``slot_start`` (packed column of its first token), ``slot_len`` and ``slot_prev``
    (column of the token that predicts its first token, -1 if none).
    """

    table: SegmentTable
    contexts: tuple[str, ...]
    n_responses: int
    max_response_len: int
    response_ids: list[Sequence[int]]
    group_offsets: list[int]  # response number of each group's first rollout
    slot_ctx: torch.Tensor
    slot_n: torch.Tensor
    slot_row: torch.Tensor
    slot_start: torch.Tensor
    slot_len: torch.Tensor
    slot_prev: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        """Tokens run through the decoder for this pack (rows x row length, padding included)."""
        return int(self.table.input_ids.numel())

    def predict_index(self, context: str) -> torch.Tensor:
        """``(N, L)`` int64 flat packed index ``row * T + col`` of the position whose output
        predicts response token ``t`` under ``context`` (the previous token; for ``t = 0`` the last
        token of the parent chain). ``-1`` past the response's end, where nothing precedes it, or
        for responses of groups that do not carry ``context``."""
        if context not in self.contexts:
            raise ValueError(f"context: expected one of {self.contexts}, got {context!r}")
        key = ("predict", context)
        if key not in self._cache:
            T = self.table.input_ids.shape[1]
            L = self.max_response_len
            sel = self.slot_ctx == self.contexts.index(context)
            n, row, start = self.slot_n[sel], self.slot_row[sel], self.slot_start[sel]
            length, prev = self.slot_len[sel], self.slot_prev[sel]
            t = torch.arange(L)
            cols = start[:, None] + t[None, :] - 1
            cols[:, 0] = prev
            ok = (t[None, :] < length[:, None]) & (cols >= 0)
            idx = torch.where(ok, row[:, None] * T + cols, torch.full_like(cols, -1))
            out = torch.full((self.n_responses, L), -1, dtype=torch.long)
            out[n] = idx
            self._cache[key] = out.to(self.table.input_ids.device)
        return self._cache[key]

    def targets(self, ignore_index: int = -100) -> torch.Tensor:
        """``(N, L)`` int64 response token ids, ``ignore_index`` past each response's end."""
        L = self.max_response_len
        rows = [list(ids) + [ignore_index] * (L - len(ids)) for ids in self.response_ids]
        return torch.tensor(rows, dtype=torch.long).view(self.n_responses, L).to(self.table.input_ids.device)

    def mask(self) -> torch.Tensor:
        """``(N, L)`` bool, True on real response tokens."""
        lens = torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)
        return (torch.arange(self.max_response_len)[None, :] < lens[:, None]).to(self.table.input_ids.device)


def _group_segments(group: Group, contexts: Sequence[str]) -> list[tuple[str, int, Sequence[int], str | None, int]]:
    """Segments of one group as ``(kind, rollout, tokens, parent kind, position offset)``."""
    prompt = group.prompt
    ctx = group.contexts_in(contexts)
    segs: list[tuple[str, int, Sequence[int], str | None, int]] = [("prompt", -1, prompt, None, 0)]
    if "pos" in ctx:
        segs.append(("pos_answer", -1, group.pos_answer, "prompt", len(prompt)))
    if "neg" in ctx:
        segs.append(("neg_answer", -1, group.neg_answer, "prompt", len(prompt)))
    mid = {"prompt": 0, "pos_answer": len(group.pos_answer), "neg_answer": len(group.neg_answer)}
    for c in ctx:
        parent = _PARENT[c]
        offset = len(prompt) + mid[parent]
        for i, resp in enumerate(group.responses):
            segs.append((c, i, resp, parent, offset))
    return segs


def pack_groups(
    groups: Sequence[Group],
    *,
    contexts: Sequence[str] = CONTEXTS,
    pad_id: int = 0,
    response_width: int | None = None,
) -> PackedGroups:
    """Pack ``groups`` end to end into one row of shared-prefix segment trees.

    Args:
        groups: the groups, each with ``G >= 1`` responses (G may differ between groups).
        contexts: which response contexts to include, a subset of ``("policy", "pos", "neg")``
            in any order; ``r+`` / ``r-`` segments are included only for ``pos`` / ``neg``. A
            group's own ``contexts`` narrows this for that group.
        pad_id: token id of padding (only an all-empty pack has any).
        response_width: ``L`` of the ``(N, L)`` outputs (default: the longest response); must be
            at least the longest response.

    Returns:
        :class:`PackedGroups`; ``table.input_ids`` has shape ``(1, T)``.
    """
    contexts = tuple(contexts)
    if not contexts or any(c not in CONTEXTS for c in contexts) or len(set(contexts)) != len(contexts):
        raise ValueError(f"contexts: expected distinct names from {CONTEXTS}, got {contexts}")
    if not groups:
        raise ValueError("groups: expected at least one group")
    for gi, g in enumerate(groups):
        if g.contexts is not None and any(c not in contexts for c in g.contexts):
            raise ValueError(f"groups[{gi}].contexts: {g.contexts} is not a subset of the pack's {contexts}")
    per_group = [_group_segments(g, contexts) for g in groups]
    sizes = [g.packed_size(contexts) for g in groups]
    rows = [list(range(len(groups)))]
    T = max(1, sum(sizes))
    S = max(sum(len(per_group[g]) for g in row) for row in rows)
    offsets = [0]
    for g in groups[:-1]:
        offsets.append(offsets[-1] + len(g.responses))
    ctx_index = {c: i for i, c in enumerate(contexts)}

    ids_rows, pos_rows = [], []
    starts, lens, parents, seg_pos = [], [], [], []
    slots: list[tuple[int, int, int, int, int, int]] = []  # ctx, n, row, start, len, prev
    for r, row in enumerate(rows):
        ids: list[int] = []
        pos: list[int] = []
        st, ln, pa, sp = [], [], [], []
        for gi in row:
            index_of: dict[str, int] = {}
            last_col: dict[str, int] = {}  # last token column of each shared segment's chain
            for kind, rollout, toks, parent, offset in per_group[gi]:
                n, col = len(toks), len(ids)
                st.append(col)
                ln.append(n)
                sp.append(offset)
                pa.append(index_of[parent] if parent is not None else -1)
                ids.extend(toks)
                pos.extend(range(offset, offset + n))
                if rollout < 0:
                    index_of[kind] = len(st) - 1
                    chain_last = last_col.get(parent, -1) if parent is not None else -1
                    last_col[kind] = col + n - 1 if n else chain_last
                else:
                    slots.append((ctx_index[kind], offsets[gi] + rollout, r, col, n, last_col[parent]))
        pad = T - len(ids)
        ids_rows.append(ids + [pad_id] * pad)
        pos_rows.append(pos + [0] * pad)
        extra = S - len(st)
        starts.append(st + [0] * extra)
        lens.append(ln + [0] * extra)
        parents.append(pa + [-1] * extra)
        seg_pos.append(sp + [0] * extra)

    def tensor(x):
        return torch.tensor(x, dtype=torch.long)

    table = SegmentTable(tensor(ids_rows), tensor(pos_rows), tensor(starts), tensor(lens), tensor(parents),
                         tensor(seg_pos))  # fmt: skip
    response_ids = [list(resp) for g in groups for resp in g.responses]
    longest = max(1, max(len(x) for x in response_ids))
    if response_width is not None and response_width < longest:
        raise ValueError(f"response_width: {response_width} is shorter than the longest response ({longest})")
    slot_t = torch.tensor(slots, dtype=torch.long).view(-1, 6)
    return PackedGroups(
        table,
        contexts,
        len(response_ids),
        response_width or longest,
        response_ids,
        offsets,
        *(slot_t[:, i].contiguous() for i in range(6)),
    )


def unshared_sequences(group: Group, context: str) -> list[list[int]]:
    """The plain (unpacked) token sequences of one context: ``[prompt, (r+|r-), response]`` per rollout."""
    mid = {"policy": [], "pos": list(group.pos_answer), "neg": list(group.neg_answer)}[context]
    return [list(group.prompt) + mid + list(resp) for resp in group.responses]
