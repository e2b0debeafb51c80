"""The layout of one DDC instance's gauges on a device, shared by the reference and the
batched step: the scale gauges' flat system (:class:`ddc.balancing.ScaleSystem`), the
rotation members as block views, which parameters are centred and which pool their second
moment. Built once from a :class:`ddc.frame.Frame`; holds index tensors and views only,
never parameters' values or optimizer state."""

from __future__ import annotations

import torch

from .balancing import ScaleSystem
from .frame import Frame
from .gauges import RotationMember, from_blocks, to_blocks

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
    """Block views of one rotation member, with a copy-based fallback."""

    def __init__(self, member: RotationMember, index: int) -> None:
        self.member = member
        self.index = index
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



def _block_shape(member: RotationMember) -> tuple[int, int, int]:
    """``(n_blocks, block, rest)``: the shape of ``member``'s block view."""
    param = member.param
    return (member.perm.numel() // member.block, member.block, param.numel() // param.shape[member.axis])


class StepLayout:
    """Index tensors and groupings of one DDC instance's gauges, built once per device.

    ``scales``: the scale gauges' :class:`~ddc.balancing.ScaleSystem`; ``rotations[r]``:
    the members of rotation gauge ``r`` as :class:`_Blocks`; ``rotation_batches``:
    (block size, rotation gauges stacked into one solve); ``pool_members[i]``: the rotation members of
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
            self.rotations.append([_Blocks(m, frame.index[m.param]) for m in gauge.members])
        self.pool_members = {i: [_Blocks(m, i) for m in members] for i, members in frame.rotation_of.items()}
        #: The rotation gauges in batches of one block size whose members have the same block
        #: shapes (a model's layers): the batched step stacks each batch into one solve.
        batches: dict[tuple, list[int]] = {}
        for r, gauge in enumerate(frame.rotation_gauges):
            batches.setdefault((gauge.block, tuple(_block_shape(m) for m in gauge.members)), []).append(r)
        self.rotation_batches: list[tuple[int, list[int]]] = [(key[0], rs) for key, rs in batches.items()]
        self.centred = sorted(frame.centred)

    def rotation_blocks(self, r: int) -> int:
        """How many blocks rotation gauge ``r`` has (its stacked matrices' count)."""
        member = self.rotations[r][0].member
        return member.perm.numel() // member.block
