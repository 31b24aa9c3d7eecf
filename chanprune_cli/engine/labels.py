"""Label tensors and the union-find of channel slots.

A *label tensor* has the shape of a tensor of the traced model; its elements are channel ids
(UNTRACKED for fixed values). Every id is a slot, or an element of one, in a `UnionFind`: ids that
meet are unioned, ids the engine cannot follow are pinned with a reason. Labels are mostly
broadcast vectors (one id per channel, expanded over the other axes), so the helpers below work
on their non-broadcast part wherever they can.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .layer_rules import UNTRACKED, Slot


class UnionFind:
    """Channel ids, the slot each stands for (None: an id of no slot), and why ids are pinned or
    approximate. The root of a set is its smallest id."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.slot_of: list[Slot | None] = []
        self.id_of: dict[Slot, int] = {}
        self.pin_reason: dict[int, str] = {}
        self.approx_reason: dict[int, str] = {}

    def new(self, slot: Slot | None = None) -> int:
        if slot is not None and slot in self.id_of:
            return self.id_of[slot]
        i = len(self.parent)
        self.parent.append(i)
        self.slot_of.append(slot)
        if slot is not None:
            self.id_of[slot] = i
        return i

    def fresh(self, owner: str, kind: str, count: int) -> torch.Tensor:
        """Ids of the slots (owner, kind, 0..count-1)."""
        return torch.tensor([self.new((owner, kind, k)) for k in range(count)], dtype=torch.long)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def link(self, slot_id: int, label: int) -> None:
        """The slot stands or falls with channel id `label` (an UNTRACKED label: nothing to do)."""
        if label >= 0:
            self.union(slot_id, label)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        # Shrink to the axes along which either varies: labels are mostly broadcast vectors.
        keep = set(varying_axes(a)) | set(varying_axes(b))
        for axis in range(a.dim()):
            if axis not in keep and a.shape[axis] > 1:
                a, b = a.narrow(axis, 0, 1), b.narrow(axis, 0, 1)
        mask = (a >= 0) & (b >= 0) & (a != b)
        if not mask.any():
            return
        # Perf (maxvit_t spent ~80 s here): `stack(...).unique(dim=1)` sorts every pair. Dedupe
        # in O(n) instead: scatter one partner per id and union those; the pairs that disagree
        # with it (rare: an id meeting several partners) are deduplicated by a 1-D sort of a
        # combined key. Same unions as sorting every pair.
        a, b = a[mask], b[mask]
        partner = torch.full((int(a.max()) + 1,), UNTRACKED, dtype=torch.long)
        partner[a] = b
        ids = unique_ids(a)
        for x, y in zip(ids.tolist(), partner[ids].tolist()):
            self.union(x, y)
        rest = b != partner[a]
        if rest.any():
            a, b = a[rest], b[rest]
            width = int(b.max()) + 1
            for key in (a * width + b).unique().tolist():
                self.union(key // width, key % width)

    def approximate(self, ids: Iterable[int], reason: str) -> None:
        for i in ids:
            self.approx_reason.setdefault(i, reason)

    def pin(self, ids: torch.Tensor | Iterable[int], reason: str) -> None:
        values = unique_ids(ids).tolist() if isinstance(ids, torch.Tensor) else set(ids)
        for i in values:
            if i >= 0:
                self.pin_reason.setdefault(i, reason)


def along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`t` along `axis`, at index 0 of every other axis (a view, no copy)."""
    return t[(0,) * axis + (slice(None),) + (0,) * (t.dim() - axis - 1)]


def axis_vector(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The ids along `axis` (UNTRACKED for an empty tensor)."""
    return along(t, axis) if t.numel() else t.new_full((t.shape[axis],), UNTRACKED)


def compact(t: torch.Tensor) -> torch.Tensor:
    """The same label tensor without its broadcast (stride-0) repeats: same set of ids, free."""
    for axis in range(t.dim()):
        if t.stride(axis) == 0 and t.shape[axis] > 1:
            t = t.narrow(axis, 0, 1)
    return t


def id_values(t: torch.Tensor) -> torch.Tensor:
    """The ids a label tensor refers to: its elements, without broadcast repeats. An empty view (a
    tensor with no rows in the example input, e.g. a detector level no box went to) still refers to
    its channels through its storage: those ids, so that it stays followed, and is pinned whole
    (conservatively) where it cannot be followed."""
    if t.numel() or not t.untyped_storage().nbytes():
        return compact(t)
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


def is_tracked(t: torch.Tensor) -> bool:
    """Whether a label tensor carries any channel id (perf: compared on its non-broadcast part)."""
    return bool((id_values(t) >= 0).any())


def unique_ids(t: torch.Tensor) -> torch.Tensor:
    """Sorted distinct non-negative ids of a label tensor.

    Perf: `Tensor.unique` sorts (0.1-0.25 s on a 1.6M-element label map, called thousands of times
    for maxvit_t); ids are small non-negative ints, so marking them in a bitmap is O(n)."""
    t = id_values(t)
    t = t[t >= 0] if t.numel() else t.reshape(-1)
    if not t.numel():
        return torch.empty(0, dtype=torch.long)
    seen = torch.zeros(int(t.max()) + 1, dtype=torch.bool)
    seen[t.reshape(-1)] = True
    return seen.nonzero().reshape(-1)


def varying_axes(t: torch.Tensor) -> list[int]:
    """The axes along which the ids of a label tensor change."""
    axes = []
    t = compact(t)  # perf: broadcast axes never vary; compare the rest on the small tensor
    for a in range(t.dim()):
        if t.shape[a] > 1 and t.stride(a) != 0 and not bool((t == t.narrow(a, 0, 1)).all()):
            axes.append(a)
    return axes


def broadcast_vec(vec: torch.Tensor, axis: int, shape: Sequence[int]) -> torch.Tensor:
    """A label tensor of `shape` holding the ids `vec` along `axis` (a view, no copy)."""
    view = [1] * len(shape)
    view[axis % len(shape)] = vec.numel()
    return vec.view(view).expand(tuple(shape))


def pad_labels(x: torch.Tensor, pad: Sequence[int], mode: str = "constant", value: int = UNTRACKED) -> torch.Tensor:
    """F.pad on labels. New positions along an axis the ids do not vary along (a spatial pad)
    belong to the same channels, so they repeat the ids; only padding an axis the ids vary along
    (the channel axis) adds untracked channels. (UNTRACKED spatial padding would make the ids vary
    spatially and pin everything downstream: pooling, Linear, reductions over H, W.)"""
    varying = set(varying_axes(x))
    for i in range(len(pad) // 2):
        axis, before, after = x.dim() - 1 - i, int(pad[2 * i]), int(pad[2 * i + 1])
        if before == 0 and after == 0:
            continue
        if axis in varying or x.shape[axis] <= 1:
            x = F.pad(x, (0, 0) * i + (before, after), mode="constant", value=value)
        else:  # constant along this axis: every position, old or new, holds the same ids
            shape = list(x.shape)
            shape[axis] += before + after
            x = x.narrow(axis, 0, 1).expand(shape)
    return x
