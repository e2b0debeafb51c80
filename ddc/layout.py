"""The layout of one DDC instance's gauges on a device, shared by the reference and the
batched step: the scale gauges' flat system (:class:`ddc.balancing.ScaleSystem`), the
rotation members as block views, which parameters are centred and which pool their second
moment. Built once from a :class:`ddc.frame.Frame`; holds index tensors and views only,
never parameters' values or optimizer state."""

from __future__ import annotations

import torch

from .balancing import ScaleSystem
from .frame import Frame
from .gauges import RotationMember, SharedRotationMember, from_blocks, to_blocks

__all__ = ["StepLayout", "block_view"]


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



def _block_shape(member: RotationMember | SharedRotationMember) -> tuple[int, int, int]:
    """``(n_blocks, block, rest)``: the shape of ``member``'s block view."""
    param = member.param
    return (member.perm.numel() // member.block, member.block, param.numel() // param.shape[member.axis])


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
        #: shapes (a model's layers): the batched step stacks each batch into one solve.
        batches: dict[tuple, list[int]] = {}
        for r, gauge in enumerate(frame.rotation_gauges):
            key = (gauge.block, tuple(_block_shape(m) for m in gauge.members), gauge.n_blocks, self.rotation_shared[r])
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
        self.centred = sorted(frame.centred)

    def rotation_blocks(self, r: int) -> int:
        """How many blocks rotation gauge ``r`` has (its stacked matrices' count)."""
        return self.rotation_sizes[r]

    def rotation_shares(self, r: int) -> list[torch.Tensor | None] | None:
        """The shares of rotation gauge ``r``'s members (:func:`ddc.functional.rotation_system`),
        None for a gauge whose members' blocks are its own."""
        return [b.share for b in self.rotations[r]] if self.rotation_shared[r] else None
