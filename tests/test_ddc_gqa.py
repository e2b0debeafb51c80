"""DDC's step enforces the grouped-query attention gauges (issue 18): the Q/K RoPE-pair
rotation shared by a KV group (``GroupedHeadRotation``), the V/O rotation shared by a KV
group (``GroupedHeadRotationVO``) and the per-pair Q/K scale (``QKPairScale``), exactly
(float64, contract item 1), on a hand-written GQA block (tests/structure_models.py:
fused key/value projection, RoPE's split-half pairs, user-written RMSNorm) and on a Llama
from ``transformers``' config. The batched step's agreement with the reference on them:
tests/test_ddc_foreach.py."""

import copy

import pytest
import torch

from ddc import DDC, GroupedHeadRotation, GroupedHeadRotationVO, HeadRotation, QKPairScale, find_gauges
from ddc_models import equivariance_deviation, train_steps
from structure_models import ZOO, LlamaBlockLM, lm_loss

#: The bound of the new kinds' equivariance, float64, 10 steps (measured 1e-14 or below).
BOUND = 1e-10
BASES = {"adam": {}, "muon": {}}   # DDC's defaults (Muon: the exact SVD orthogonaliser)
KINDS = [GroupedHeadRotation, GroupedHeadRotationVO, QKPairScale]


def _found(name):
    """The model (float64), its gauges found once, a function giving those gauges on a copy
    of the model (``equivariance_deviation`` copies it), the loss and the batches."""
    model, example, loss, loss_fn, batches = ZOO[name]()
    model = model.double()
    found = find_gauges(model, example, loss=loss, log=False)
    return model, found, lambda m: _on(model, list(found), m), loss_fn, batches


def _on(model, gauges, copy_of_model):
    """``gauges`` (built on ``model``) built on ``copy_of_model`` instead: a deep copy with
    each parameter mapped to the copy's (find_gauges once, not on every copy)."""
    memo = {id(p): q for p, q in zip(model.parameters(), copy_of_model.parameters())}
    return copy.deepcopy(gauges, memo)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_each_grouped_kind_alone_is_enforced_exactly(kind, base):
    """DDC with only the gauges of one new kind: its trajectories from θ and from g·θ agree
    up to g (random elements of that kind); AdamW's do not, so the harness can fail."""
    model, _, select_all, loss_fn, batches = _found("llama_block")
    select = lambda m: [g for g in select_all(m) if type(g) is kind]
    assert len(select(model)) == 1
    ddc = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **BASES[base])
    assert equivariance_deviation(model, ddc, loss_fn, batches, select) <= BOUND
    adamw = lambda m, gauges: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    assert equivariance_deviation(model, adamw, loss_fn, batches, select) >= 1e-4


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", ["llama_block", "hf_llama_gqa",
                                  pytest.param("hf_llama_mqa", marks=pytest.mark.slow)])
def test_ddc_defaults_on_gqa_models_enforce_every_found_gauge(name, base):
    """Every gauge find_gauges proves on a GQA / MQA model is enforced (nothing in
    ``not_enforced``), and DDC with its defaults is equivariant under all of them together."""
    model, found, select, loss_fn, batches = _found(name)
    assert found.not_enforced == []
    assert {type(g) for g in found} >= set(KINDS)
    ddc = lambda m, gauges: DDC(m, gauges=gauges, base=base)
    assert equivariance_deviation(model, ddc, loss_fn, batches, select) <= BOUND


def _pair_coordinates(model: LlamaBlockLM) -> torch.Tensor:
    """The pair scale's gauge coordinates: per (key/value head, RoPE pair), the log of the
    query rows' squared norm (over the group) minus that of the key rows."""
    gauge = QKPairScale(model.wq, model.wkv, 8, 4, 2, rope="half")
    sides = []
    for m in gauge.members:
        rows = m.param.detach().index_select(0, m.positions).square().sum(1)
        sides.append(torch.zeros(gauge.size, dtype=rows.dtype).index_add_(0, m.share, rows))
    return sides[0].log() - sides[1].log()


@pytest.mark.parametrize("base", BASES)
def test_a_step_has_no_pair_scale_component(base):
    """With the pair scale declared alone, the gauge coordinates do not move (to round-off)
    while the weights do; under AdamW they move."""
    torch.manual_seed(0)
    batches = ZOO["llama_block"]()[4]
    moved = {}
    for name in ("ddc", "adamw"):
        model = LlamaBlockLM().double()
        torch.nn.init.normal_(model.wq.weight, std=0.3)   # unbalanced q/k pairs to start from
        optimizer = (DDC(model, gauges=[QKPairScale(model.wq, model.wkv, 8, 4, 2, rope="half")], base=base,
                         lr=1e-2, weight_decay=0.1) if name == "ddc"
                     else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
        before, weights = _pair_coordinates(model), model.wq.weight.detach().clone()
        train_steps(model, optimizer, batches[:5], lm_loss)
        moved[name] = float((_pair_coordinates(model) - before).abs().max())
        assert float((model.wq.weight.detach() - weights).abs().max()) > 1e-3
    assert moved["ddc"] <= 1e-10, moved
    assert moved["adamw"] >= 1e-3, moved


def test_state_dict_round_trip_continues_identically_with_gqa_gauges():
    """The pair scales' log-scales and the shared rotations' bases (``rotation_solve="cg"``)
    are saved and restored: a resumed run takes the same steps."""
    model, _, select, loss_fn, batches = _found("llama_block")
    optimizer = DDC(model, gauges=select(model), lr=1e-2, weight_decay=0.1, rotation_solve="cg")
    train_steps(model, optimizer, batches[:3], loss_fn)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train_steps(model, optimizer, batches[3:6], loss_fn)
    resumed = LlamaBlockLM().double()
    resumed.load_state_dict(saved_model)
    resumed_opt = DDC(resumed, gauges=select(resumed), lr=1e-2, weight_decay=0.1, rotation_solve="cg")
    resumed_opt.load_state_dict(saved_state)
    train_steps(resumed, resumed_opt, batches[3:6], loss_fn)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_pair_scale_with_a_rotation_it_does_not_commute_with_is_refused():
    """A pair scale scales a RoPE pair's rows by one factor, which commutes with the pair's
    rotation only: with a whole-head rotation of the same rows DDC refuses the set."""
    model = LlamaBlockLM()
    pair = QKPairScale(model.wq, model.wkv, 8, 4, 2, rope="half")
    whole_head = HeadRotation.sliced(model.wq, model.wkv, 8, 2, rope=None)   # the first two query heads
    with pytest.raises(ValueError, match="a pair scale scales by different factors"):
        DDC(model, gauges=[pair, whole_head])
