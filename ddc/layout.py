"""The layout of one DDC instance's gauges on a device, shared by the reference and the
batched step: the scale gauges' flat system (:class:`ddc.balancing.ScaleSystem`), the
rotation members as block views, which parameters are centred and which pool their second
moment. Built once from a :class:`ddc.frame.Frame`; holds index tensors and views only,
never parameters' values or optimizer state."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .balancing import ScaleSystem
from .frame import Frame
from .gauges import RotationMember, SharedRotationMember, from_blocks, to_blocks

__all__ = ["StepLayout", "SharedScaleSystem", "block_view"]


def _contiguous_slice(member: RotationMember) -> int | None:
    """Start of ``member``'s entries if they are a contiguous slice of its axis, else None."""
    perm = member.perm
    n = perm.numel()
    start = int(perm[0]) if n else 0
    if n == 0 or not torch.equal(perm, torch.arange(start, start + n, dtype=perm.dtype)):
        return None
    return start


def block_view(tensor: torch.Tensor, member: RotationMember, start: int | None = None) -> torch.Tensor | None:
    """``tensor`` (shaped like ``member.param``) as an ``(n_blocks, block, rest)`` *view*
    (writing into it writes ``tensor``), or ``None`` when the member's entries are not a
    contiguous slice of its axis (RoPE's ``half`` layout) or no view exists. ``start``:
    the slice's start if already known."""
    if start is None:
        start = _contiguous_slice(member)
        if start is None:
            return None
    n = member.perm.numel()
    try:  # view() (unlike reshape) never copies: it raises where no view exists
        if member.axis == 0:
            return tensor.narrow(0, start, n).view(n // member.block, member.block, -1)
        moved = tensor.movedim(member.axis, 0).narrow(0, start, n)
        return moved.unflatten(0, (n // member.block, member.block)).view(n // member.block, member.block, -1)
    except RuntimeError:
        return None


class _Blocks:
    """Block views of one rotation member, with a copy-based fallback. ``share``: for a
    member of a shared rotation (:class:`ddc.gauges.SharedRotationMember`), the gauge block
    each of its ``n_blocks`` blocks is rotated by (on ``device``); None for a plain member,
    whose block ``j`` is the gauge's block ``j``."""

    def __init__(self, member: RotationMember | SharedRotationMember, index: int,
                 device: torch.device | None = None) -> None:
        self.member = member
        self.index = index
        self.n_blocks = member.perm.numel() // member.block
        share = getattr(member, "share", None)
        self.share = share.to(device) if share is not None else None
        self.start = _contiguous_slice(member)
        self.viewable = self.start is not None and block_view(member.param.detach(), member, self.start) is not None

    def get(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.viewable:
            view = block_view(tensor, self.member, self.start)
            if view is not None:
                return view
        return to_blocks(tensor, self.member)

    def set(self, tensor: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Write ``blocks`` into ``tensor``'s member entries; returns the tensor to keep."""
        if self.viewable:
            view = block_view(tensor, self.member, self.start)
            if view is not None:
                view.copy_(blocks)
                return tensor
        return from_blocks(blocks, self.member, into=tensor)



class _StackedBlocks:
    """Member ``k`` of every gauge of a rotation batch (or the pooled rotation members of
    equally shaped parameters) on one *stack* of their parameters, ``(P, *shape)`` in the
    order of ``indices``: the members are the same contiguous slice (``start``, ``size``)
    of the same ``axis`` of equally shaped parameters (a model's layers), so the stack's
    blocks are one reshape instead of a view and a ``cat`` per member, and one copy writes
    them back. The blocks come in the order the per-member views concatenated give."""

    def __init__(self, members: Sequence[_Blocks]) -> None:
        first = members[0].member
        self.indices = [b.index for b in members]
        self.axis: int = first.axis
        self.start: int = members[0].start
        self.size = first.perm.numel()
        self.block = first.block
        self.n_blocks = members[0].n_blocks
        self.rest = first.param.numel() // first.param.shape[self.axis]
        self.full = self.start == 0 and self.size == first.param.shape[self.axis]
        #: Whether :meth:`get` of the (contiguous) stack is a view of it (whole axes 0, or
        #: a single parameter's slice), so that writing into the blocks writes the stack.
        probe = torch.empty((len(members),) + tuple(first.param.shape), device="meta")
        try:
            self._entries(probe).view(len(members) * self.n_blocks, self.block, self.rest)
            self.view = True
        except RuntimeError:
            self.view = False
        #: The dimension of :meth:`pool_view` that runs within a block.
        self.block_dim = self.axis + 2

    @staticmethod
    def fits(members: Sequence[_Blocks]) -> bool:
        """Whether ``members`` (of distinct parameters) can share one stack."""
        first = members[0]
        return (len({b.index for b in members}) == len(members)
                and all(b.start is not None and b.start == first.start and b.member.axis == first.member.axis
                        and b.member.block == first.member.block
                        and b.member.perm.numel() == first.member.perm.numel()
                        and b.member.param.shape == first.member.param.shape for b in members))

    def overlaps(self, other: _StackedBlocks) -> bool:
        """Whether ``self`` and ``other``, on the same parameters, share entries (they
        are not disjoint slices of one axis)."""
        return other.axis != self.axis or not (self.start + self.size <= other.start
                                               or other.start + other.size <= self.start)

    def _entries(self, stacked: torch.Tensor) -> torch.Tensor:
        """The members' entries of ``stacked``, ``(P, size, *rest)``, a view."""
        moved = stacked.movedim(self.axis + 1, 1) if self.axis else stacked
        return moved if self.full else moved.narrow(1, self.start, self.size)

    def get(self, stacked: torch.Tensor) -> torch.Tensor:
        """The blocks of every member, ``(P·n_blocks, block, rest)``: a view of ``stacked``
        (contiguous, of the members' parameters) where :attr:`view`, else a copy."""
        entries = self._entries(stacked)
        shape = (stacked.shape[0] * self.n_blocks, self.block, self.rest)
        return entries.view(shape) if self.view else entries.reshape(shape)

    def set(self, stacked: torch.Tensor, blocks: torch.Tensor) -> None:
        """Write ``blocks`` (as :meth:`get` gives them) into ``stacked``'s member entries."""
        entries = self._entries(stacked)
        entries.copy_(blocks.reshape(entries.shape))

    def pool_view(self, stacked: torch.Tensor) -> torch.Tensor:
        """The member entries of ``stacked`` with ``axis`` split into (block, entry of the
        block), a view; :attr:`block_dim` runs within a block."""
        entries = stacked if self.full else stacked.narrow(self.axis + 1, self.start, self.size)
        return entries.unflatten(self.axis + 1, (self.n_blocks, self.block))


def _batch_stacks(positions: Sequence[Sequence[_Blocks]]
                  ) -> tuple[list[list[int]], list[tuple[int, _StackedBlocks]]] | None:
    """How a rotation batch reads its members from stacks (:class:`_StackedBlocks`): the
    stacks' parameters, and per member position its stack and blocks; None where some
    position's members cannot share a stack, or where two positions read entries of the
    same parameters other than as disjoint slices of one axis of one stack."""
    stacks: list[list[int]] = []
    plan: list[tuple[int, _StackedBlocks]] = []
    for members in positions:
        if not _StackedBlocks.fits(members):
            return None
        blocks = _StackedBlocks(members)
        if blocks.indices in stacks:
            k = stacks.index(blocks.indices)
            if any(j == k and other.overlaps(blocks) for j, other in plan):
                return None
        elif any(set(blocks.indices) & set(s) for s in stacks):
            return None
        else:
            stacks.append(blocks.indices)
            k = len(stacks) - 1
        plan.append((k, blocks))
    return stacks, plan


def _block_shape(member: RotationMember | SharedRotationMember) -> tuple[int, int, int]:
    """``(n_blocks, block, rest)``: the shape of ``member``'s block view."""
    param = member.param
    return (member.perm.numel() // member.block, member.block, param.numel() // param.shape[member.axis])


class SharedScaleSystem(ScaleSystem):
    """:class:`~ddc.balancing.ScaleSystem` for scale gauges that scale *some* entries of an
    axis, several entries per coordinate (:class:`ddc.gauges.QKPairScale`: a coordinate
    scales the query rows of one RoPE pair in every query head of a group, and divides the
    key rows of that pair), next to the ordinary ones.

    The balancing reads only squared norms summed per coordinate, so each parameter with
    such entries is presented to the solve as *terms*, tensors on which every scaled axis
    again has one slice per coordinate: its entries of one sign, ordered by coordinate, with
    the axis split into (coordinate, entry of that coordinate) so the solve sums over the
    entries; and its entries of no pair scale (the values of a fused key/value projection)
    where another gauge scales its other axis. Every solve (:meth:`solve`, :meth:`balance`,
    :meth:`residual`) then runs unchanged on the terms' squared norms (:meth:`reduce`);
    :meth:`factors` maps the log-scales back to the parameters. ``factor_axes``: the
    parameters scaled (their indices are what the steps read).
    """

    def __init__(self, frame: Frame, device: torch.device) -> None:
        shapes = [tuple(p.shape) for p in frame.params]
        sizes = [g.size for g in frame.scale_gauges]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        n_total = offsets[-1]
        #: (parameter, axis, entries (on device) or None, coordinates or 0): how to cut a term
        self.terms: list[tuple[int, int | None, torch.Tensor | None, int]] = []
        term_axes: dict[int, list[tuple[int, int, int]]] = {}
        term_shapes: list[tuple[int, ...]] = []
        #: per parameter with shared entries: (axis, index of each entry into
        #: [exp(s), exp(−s), 1]) for :meth:`factors`
        self.shared_index: dict[int, tuple[int, torch.Tensor]] = {}
        for i in sorted(set(frame.scale_axes) | set(frame.shared_scale_of)):
            dense = frame.scale_axes.get(i, [])
            if i not in frame.shared_scale_of:
                term_axes[len(self.terms)] = list(dense)
                term_shapes.append(shapes[i])
                self.terms.append((i, None, None, 0))
                continue
            axis = frame.shared_scale_of[i][0][1].axis
            g = frame.shared_scale_of[i][0][0]
            codes = frame.shared_scale_codes(i)
            index = torch.full_like(codes, 2 * n_total)
            covered = codes >= 0
            index[covered] = offsets[g] + codes[covered] // 2 + n_total * (codes[covered] % 2)
            self.shared_index[i] = (axis, index.to(device))
            for negative in (0, 1):
                mine = (codes >= 0) & (codes % 2 == negative)
                if not bool(mine.any()):
                    continue
                coords = codes[mine] // 2
                counts = torch.bincount(coords, minlength=sizes[g])
                if bool((counts != counts[0]).any()):
                    raise ValueError(f"{frame.scale_gauges[g]!r}: every coordinate must scale as many entries "
                                     f"of a {shapes[i]} parameter (got {sorted(set(counts.tolist()))})")
                entries = torch.nonzero(mine).squeeze(1)[torch.argsort(coords, stable=True)]
                shape = list(shapes[i])
                shape[axis:axis + 1] = [sizes[g], int(counts[0])]
                term_axes[len(self.terms)] = sorted([(axis, g, -1 if negative else 1)]
                                                    + [(d + (d > axis), h, sign) for d, h, sign in dense])
                term_shapes.append(tuple(shape))
                self.terms.append((i, axis, entries.to(device), sizes[g]))
            rest = torch.nonzero(codes < 0).squeeze(1)
            if dense and rest.numel():
                shape = list(shapes[i])
                shape[axis] = rest.numel()
                term_axes[len(self.terms)] = list(dense)
                term_shapes.append(tuple(shape))
                self.terms.append((i, axis, rest.to(device), 0))
        super().__init__(term_axes, term_shapes, sizes, [g.level for g in frame.scale_gauges], device)
        self.factor_axes = {i: list(frame.scale_axes.get(i, [])) for i in sorted(set(frame.scale_axes)
                                                                                  | set(frame.shared_scale_of))}
        # :meth:`factors` of the parameters: each dense axis's factors, then the shared
        # axis's factor per entry (1 where no pair scale acts).
        pieces = {i: [(axis, self._dense_index(g, sign)) for axis, g, sign in frame.scale_axes.get(i, [])]
                  for i in self.factor_axes}
        for i, (axis, index) in self.shared_index.items():
            pieces[i].append((axis, index.cpu()))
        self._plan_factors(pieces, {i: len(shapes[i]) for i in self.factor_axes})

    def reduce(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`ScaleSystem.reduce` of the terms cut from the parameters ``points``."""
        terms = []
        for i, axis, entries, coords in self.terms:
            x = points[i]
            if entries is not None:
                x = x.index_select(axis, entries)
                if coords:
                    x = x.unflatten(axis, (coords, -1))
            terms.append(x)
        return super().reduce(terms)


class StepLayout:
    """Index tensors and groupings of one DDC instance's gauges, built once per device.

    ``scales``: the scale gauges' :class:`~ddc.balancing.ScaleSystem`; ``rotations[r]``:
    the members of rotation gauge ``r`` as :class:`_Blocks` (a shared rotation's members
    carry their ``share``); ``rotation_batches``: (block size, rotation gauges stacked into
    one solve); ``pool_members[i]``: the rotation members of
    parameter ``i`` (its second moment is pooled over their blocks); ``centred``: the
    parameters centred on axis 0 (logit shift)."""

    def __init__(self, frame: Frame, device: torch.device) -> None:
        self.device = device
        self.n_params = len(frame.params)
        if frame.shared_scale_of:
            self.scales: ScaleSystem = SharedScaleSystem(frame, device)
        else:
            self.scales = ScaleSystem(frame.scale_axes, [p.shape for p in frame.params],
                                      [g.size for g in frame.scale_gauges], [g.level for g in frame.scale_gauges],
                                      device)
        self.rotations: list[list[_Blocks]] = []
        for gauge in frame.rotation_gauges:
            self.rotations.append([_Blocks(m, frame.index[m.param], device) for m in gauge.members])
        #: Per rotation gauge: its number of blocks (orthogonal matrices), and whether any
        #: member shares them (a shared rotation: the solve sums over the sharing blocks).
        self.rotation_sizes = [gauge.n_blocks for gauge in frame.rotation_gauges]
        self.rotation_shared = [any(b.share is not None for b in members) for members in self.rotations]
        self.pool_members = {i: [_Blocks(m, i) for m in members] for i, members in frame.rotation_of.items()}
        #: The rotation gauges in batches of one block size whose members have the same block
        #: shapes and rotate the same axes (a model's layers): the batched step stacks each
        #: batch into one solve. (Gauges on other axes, such as a query/key and a value/output
        #: rotation of square matrices, could share the solve but not the parameter stacks,
        #: :attr:`rotation_batch_stacks`, which save more.)
        batches: dict[tuple, list[int]] = {}
        for r, gauge in enumerate(frame.rotation_gauges):
            key = (gauge.block, tuple(_block_shape(m) for m in gauge.members), gauge.n_blocks, self.rotation_shared[r],
                   tuple(m.axis for m in gauge.members))
            batches.setdefault(key, []).append(r)
        self.rotation_batches: list[tuple[int, list[int]]] = [(key[0], rs) for key, rs in batches.items()]
        #: Per batch, shared rotations only: each member's shares over the stacked blocks
        #: (gauge ``r``'s shares offset by the blocks of the gauges before it); None for a
        #: batch of plain rotations (a batch holds one kind).
        self.rotation_batch_shares: list[list[torch.Tensor] | None] = []
        for _, rs in self.rotation_batches:
            offsets = [sum(self.rotation_sizes[q] for q in rs[:k]) for k in range(len(rs))]
            self.rotation_batch_shares.append(
                [torch.cat([self.rotations[r][k].share + offset for r, offset in zip(rs, offsets)])
                 for k in range(len(self.rotations[rs[0]]))] if self.rotation_shared[rs[0]] else None)
        #: Per batch: its stacks (:func:`_batch_stacks`), None where it reads per-member views.
        self.rotation_batch_stacks = [_batch_stacks([[self.rotations[r][k] for r in rs]
                                                     for k in range(len(self.rotations[rs[0]]))])
                                      for _, rs in self.rotation_batches]
        #: The pooled parameters in groups of equal shapes and rotation members, each group
        #: pooled on one stack: (the parameters, per member of theirs a
        #: :class:`_StackedBlocks` over the group); None where a parameter's members cannot
        #: be stacked (it pools through its own views, :attr:`pool_members`).
        groups: dict[tuple, list[int]] = {}
        for i, members in self.pool_members.items():
            if all(b.start is not None for b in members):
                key: tuple = (tuple(frame.params[i].shape),
                              tuple((b.member.axis, b.start, b.member.perm.numel(), b.member.block) for b in members))
            else:  # some member is no slice (RoPE's "half" layout): pooled alone
                key = ("alone", i)
            groups.setdefault(key, []).append(i)
        self.pool_stacks: list[tuple[list[int], list[_StackedBlocks] | None]] = [
            (index, None if key[0] == "alone" else
             [_StackedBlocks([self.pool_members[i][k] for i in index]) for k in range(len(key[1]))])
            for key, index in groups.items()]
        self.centred = sorted(frame.centred)

    def rotation_blocks(self, r: int) -> int:
        """How many blocks rotation gauge ``r`` has (its stacked matrices' count)."""
        return self.rotation_sizes[r]

    def rotation_shares(self, r: int) -> list[torch.Tensor | None] | None:
        """The shares of rotation gauge ``r``'s members (:func:`ddc.functional.rotation_system`),
        None for a gauge whose members' blocks are its own."""
        return [b.share for b in self.rotations[r]] if self.rotation_shared[r] else None
