"""The one functional entry of the DDC step (``ddc.step.ddc_step``): the reference
(``foreach=False``) and the batched step (``foreach=True``) run on the same explicit lists
(parameters, gradients, options, base state, frame) give the same step, with no optimizer
object anywhere (float64; bounds as in tests/test_ddc_foreach.py)."""

import copy

import pytest
import torch

from ddc import functional as F
from ddc.frame import Frame
from ddc.step import BaseState, FrameState, MuonOptions, ParamOptions, StepLayout, StepOptions, ddc_step
from ddc_models import TinyTransformer, classification_loss, make_batches
from test_ddc_foreach import MUON_SVD_TOLERANCE, TOLERANCE

MUON = MuonOptions(momentum=0.95, nesterov=True, orthogonalizer="svd", ns_coefficients=(3.4445, -4.775, 2.0315),
                   ns_steps=5, eps=1e-7, adjust_lr_fn="match_rms_adamw")


def run(model, base, foreach, batches, rotation_solve="eigh"):
    """Steps through ``ddc_step`` alone: the caller keeps the frame and the state."""
    frame = Frame(model.gauges())
    layout = StepLayout(frame, torch.device("cpu"))
    params = frame.params
    options = [ParamOptions(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8,
                            muon=MUON if base == "muon" and p.ndim >= 2 else None) for p in params]
    states = [{} for _ in params]
    for st, p, o in zip(states, params, options):
        (F.init_muon_state if o.muon is not None else F.init_adam_state)(st, p.detach(), torch.float64)
    state = BaseState([st.get("exp_avg") for st in states], [st.get("exp_avg_sq") for st in states],
                      [st.get("step") for st in states], [st.get("momentum_buffer") for st in states])
    frame_state = FrameState(torch.zeros(layout.scales.n, dtype=torch.float64), False,
                             [None] * len(layout.rotations), refresh=True)
    opts = StepOptions(work=torch.float64, freeze=True, reference_norm=1.0, zero_level=torch.finfo(torch.float64).eps ** 0.5,
                       balance_tol=1e-14, balance_max_iter=50, rotation_solve=rotation_solve)
    for batch in batches:
        model.zero_grad()
        classification_loss(model, batch)[0].backward()
        with torch.no_grad():
            report = ddc_step(layout, params, [p.grad for p in params], options, state, frame_state, opts,
                              foreach=foreach)
        frame_state = FrameState(report.log_scales, True, report.rotation_bases, refresh=False)
    return model.requires_grad_(False), frame_state


@pytest.mark.parametrize("rotation_solve", ["eigh", "cg"])
@pytest.mark.parametrize("base", ["adam", "muon"])
def test_reference_and_batched_step_agree_through_the_functional_entry(base, rotation_solve):
    torch.manual_seed(0)
    # No biases: the key bias is a dead coordinate (it shifts every logit of a query alike),
    # whose gradient is round-off that Adam divides by eps, so the two paths' last-bit
    # differences grow there to 7e-12 (measured here; test_ddc_foreach._without_key_bias).
    # cg: no RoPE, so the Q/K rotation has 4-wide blocks and takes the CG solve.
    model = TinyTransformer(rope=None if rotation_solve == "cg" else "interleaved", mlp="swiglu",
                            bias=False).double()
    batches = make_batches(model, 4)
    (ref, ref_frame), (fast, fast_frame) = (run(copy.deepcopy(model), base, foreach, batches, rotation_solve)
                                            for foreach in (False, True))
    worst = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref.parameters(), fast.parameters()))
    bound = MUON_SVD_TOLERANCE if base == "muon" else TOLERANCE
    assert worst <= bound, f"{base}/{rotation_solve}: batched vs reference {worst:.2e}"
    assert torch.allclose(ref_frame.log_scales, fast_frame.log_scales, rtol=0, atol=1e-12)
    moved = max(float((a.detach() - b).abs().max()) for a, b in zip(model.parameters(), fast.parameters()))
    assert moved > 1e-3   # the steps did something
    if rotation_solve == "cg":   # the batched step took bases (eigh at the first step), the reference none
        assert all(b is not None for b, g in zip(fast_frame.rotation_bases, Frame(fast.gauges()).rotation_gauges)
                   if g.block > 2)
