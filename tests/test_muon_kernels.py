"""ddc.muon_kernels (torch's Muon kernels, vendored) against the installed torch.optim.Muon,
and no private torch optimizer imports anywhere in ddc/ or baselines/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ddc import muon_kernels as K

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8, 8), (12, 5), (5, 12), (1, 7)]  # square, tall, wide, a single row


def _run_both(dtype: torch.dtype, adjust_lr_fn: str | None, nesterov: bool, weight_decay: float,
              steps: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                       list[torch.Tensor]]:
    """``steps`` Muon steps by torch.optim.Muon and by the vendored kernel, from the same
    parameters and gradients; returns (torch params, vendored params, torch bufs, vendored bufs)."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(steps)]
    options = dict(lr=0.02, weight_decay=weight_decay, momentum=0.9, nesterov=nesterov,
                   ns_coefficients=(K.DEFAULT_A, K.DEFAULT_B, K.DEFAULT_C), eps=K.EPS,
                   ns_steps=K.DEFAULT_NS_STEPS, adjust_lr_fn=adjust_lr_fn)
    reference = [p.clone().requires_grad_() for p in start]
    optimizer = torch.optim.Muon(reference, **options)
    vendored = [p.clone() for p in start]
    bufs = [torch.zeros_like(p) for p in start]
    for step_grads in grads:
        for p, g in zip(reference, step_grads):
            p.grad = g.clone()
        optimizer.step()
        K.muon(vendored, [g.clone() for g in step_grads], bufs, **options)
    torch_bufs = [optimizer.state[p]["momentum_buffer"] for p in reference]
    return [p.detach() for p in reference], vendored, torch_bufs, bufs


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "spectral_unclamped"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_vendored_muon_is_bitwise_torch_muon_float32(adjust_lr_fn, nesterov, weight_decay):
    ref, ours, ref_bufs, our_bufs = _run_both(torch.float32, adjust_lr_fn, nesterov, weight_decay)
    for a, b in zip(ref + ref_bufs, ours + our_bufs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_vendored_muon_matches_torch_muon_float64(adjust_lr_fn, nesterov):
    ref, ours, ref_bufs, our_bufs = _run_both(torch.float64, adjust_lr_fn, nesterov, weight_decay=0.1)
    for a, b in zip(ref + ref_bufs, ours + our_bufs):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_the_comparison_is_not_vacuous():
    """The parameters moved, and the two lr conventions give different results."""
    start_gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=start_gen) for s in SHAPES]
    original, _, _, _ = _run_both(torch.float32, "original", True, 0.1)
    matched, _, _, _ = _run_both(torch.float32, "match_rms_adamw", True, 0.1)
    assert all(not torch.equal(p, q) for p, q in zip(start, original))
    assert any(not torch.equal(p, q) for p, q in zip(original, matched))


def test_adjust_lr_conventions():
    assert K.adjust_lr(1.0, None, torch.Size([12, 3])) == pytest.approx(2.0)
    assert K.adjust_lr(1.0, "original", torch.Size([3, 12])) == pytest.approx(1.0)
    assert K.adjust_lr(1.0, "match_rms_adamw", torch.Size([3, 25])) == pytest.approx(1.0)
    assert K.adjust_lr(1.0, "spectral_unclamped", torch.Size([3, 12])) == pytest.approx(0.5)


def test_newton_schulz_rejects_non_matrices():
    with pytest.raises(ValueError, match="2D"):
        K.zeropower_via_newtonschulz(torch.ones(3), (K.DEFAULT_A, K.DEFAULT_B, K.DEFAULT_C), 5, K.EPS)


# ``torch.optim._muon``, ``from torch.optim.optimizer import _get_scalar_dtype``, ``torch._foo``:
# any private name reached through torch.
PRIVATE_TORCH = re.compile(r"torch(\.\w+)*\._[a-z]\w*|from\s+torch[\w.]*\s+import\s+[^#\n]*\b_[a-z]\w*")


def test_no_private_torch_imports_in_library_code():
    # The pattern catches the imports this project used to have.
    for old in ("from torch.optim._muon import DEFAULT_A, EPS",
                "from torch.optim.optimizer import _get_scalar_dtype",
                "import torch._dynamo"):
        assert PRIVATE_TORCH.search(old), old
    assert not PRIVATE_TORCH.search("from torch.optim.adamw import adamw as adamw_kernel")
    offenders = []
    for package in ("ddc", "baselines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if "import" in code and PRIVATE_TORCH.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "private torch imports:\n" + "\n".join(offenders)
