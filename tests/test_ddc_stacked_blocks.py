"""The batched step's stacked rotation blocks (:class:`ddc.layout._StackedBlocks`): on the
task models every rotation batch and every pooling group is read from stacks of the
members' parameters, and the step computes what it computes through per-member views
(the path of layouts the stacks cannot take), float64, to round-off."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ddc import DDC
from task_models import float64_case

STEPS = 4
TOLERANCE = 1e-13
ROTATION_CASES = ["gpt-swiglu-rope-layernorm", "gpt-relu-norope-rmsnorm", "vit"]


def _loss(model, batch):
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch[1].reshape(-1))


def _per_member_views(layout) -> None:
    """``layout`` as one the stacks cannot take: every rotation batch and pooled parameter
    through its own views."""
    layout.rotation_batch_stacks = [None] * len(layout.rotation_batches)
    layout.pool_stacks = [([i], None) for i in layout.pool_members]


@pytest.mark.parametrize("base", ["adam", "muon"])
@pytest.mark.parametrize("case", ROTATION_CASES)
def test_stacked_blocks_equal_per_member_views(case, base, cifar_root):
    model, batches = float64_case(case, cifar_root, STEPS)
    options = {"orthogonalizer": "svd"} if base == "muon" else {}
    finals = []
    for stacked in (True, False):
        m = copy.deepcopy(model)
        opt = DDC(m, m.gauges(), base=base, lr=1e-2, weight_decay=0.1, **options)
        layout = opt._layout_on(next(m.parameters()).device)
        if stacked:
            assert layout.rotation_batches and all(s is not None for s in layout.rotation_batch_stacks)
            assert all(stacks is not None for _, stacks in layout.pool_stacks)
        else:
            _per_member_views(layout)
        for batch in batches:
            opt.zero_grad()
            _loss(m, batch).backward()
            opt.step()
        finals.append([p.detach().clone() for p in m.parameters()])
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)) for a, b in zip(*finals))
    assert worst <= TOLERANCE, f"{case}/{base}: stacked vs per-member views {worst:.2e}"
