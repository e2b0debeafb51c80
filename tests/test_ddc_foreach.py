"""The batched DDC step (``foreach=True``, the default) computes the reference step
(``foreach=False``): float64, every task model at tiny size with its declared gauges, both
bases (Muon with the exact SVD orthogonaliser), several steps, to 1e-12; also on the
degenerate orbits of tests/test_ddc_degenerate.py, a ReLU chain (deep overlapping
gauges), RoPE's "half" layout and packed attention (copy-based block path), with no gauges
at all, with bfloat16 parameters (to bfloat16 round-off, see BF16_TOLERANCE), and on a
grouped-query attention block (shared rotations, pair scales)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddc import DDC
from ddc.gauges import HeadRotation, HeadRotationVO, NormGain
from ddc_models import ReluChain, ReluMLP, TinyTransformer, classification_loss, make_batches
from test_ddc_degenerate import CASES as DEGENERATE
from task_models import CASES as TASK_CASES
from task_models import float64_case

STEPS = 4
TOLERANCE = 1e-12
#: Muon's exact polar factor amplifies round-off of its input (the two paths' canonical
#: gradients differ in the last bit, as their balancing solves take different iteration
#: paths to the same frame): a kept singular value near the cut-off (1e-6 of the largest;
#: tiny models' gradients have rank below their width) turns a 1e-16 input difference into
#: a larger output one. Measured (one thread): up to 7.4e-13 on the task models at lr 1e-3
#: (ViT), up to 4.5e-12 at lr 1e-2; the bound leaves room for the round-off of other
#: thread counts. Adam: measured up to 4.0e-13.
MUON_SVD_TOLERANCE = 1e-11
#: bfloat16 parameters: both paths compute in float32 and round to bfloat16 on the write;
#: a float32 round-off difference can flip the last bfloat16 bit of an entry, so the bound
#: is two bfloat16 ulps of the largest entry (measured: 0, bit-identical, on one thread).
BF16_TOLERANCE = 2 ** -6
BASES = {"adam": {}, "muon": {"orthogonalizer": "svd"}}


def logits_loss(model, batch):
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch[1].reshape(-1)), logits


def deviation(model, batches, loss_fn, gauges=None, **options):
    """Run both paths from the same point on the same batches; return the largest
    deviation of a parameter relative to its largest entry, and the two optimizers.

    Both balance to 1e-14 (log-scale units) rather than the float64 default 1e-12: the
    reference stops with up to ``balance_tol`` left in its frame, and that residual (not a
    difference of the two steps) would otherwise dominate the comparison."""
    options.setdefault("balance_tol", 1e-14)
    runs = []
    for foreach in (False, True):
        m = copy.deepcopy(model)
        g = gauges(m) if gauges is not None else None
        opt = DDC(m, g, foreach=foreach, **options) if g is not None else DDC(m, foreach=foreach, **options)
        for batch in batches:
            opt.zero_grad()
            loss_fn(m, batch)[0].backward()
            opt.step()
        runs.append((m, opt))
    (ref, _), (fast, _) = runs
    worst = 0.0
    for a, b in zip(ref.parameters(), fast.parameters()):
        scale = a.detach().abs().max().float().clamp_min(1e-300)
        worst = max(worst, float((a.detach().double() - b.detach().double()).abs().max() / scale))
    return worst, runs


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", TASK_CASES)
def test_fast_step_equals_reference_on_task_models(case, base, cifar_root):
    model, batches = float64_case(case, cifar_root, STEPS)
    # lr and weight decay of configs/optimizer/ddc.yaml. At lr 1e-2 the tiny grokking
    # transformer amplifies round-off: the deviation grows from 1e-15 after one step to
    # 1e-12 after four whatever balance_tol is (measured), which tests the dynamics rather
    # than the step; at lr 1e-3 it stays near 1e-15.
    worst, runs = deviation(model, batches, logits_loss, base=base, lr=1e-3, weight_decay=0.1,
                            **BASES[base])
    assert worst <= (TOLERANCE if base == "adam" else MUON_SVD_TOLERANCE), \
        f"{case}/{base}: fast vs reference {worst:.2e}"
    # The frames agree too (the state both paths keep).
    (_, ref_opt), (_, fast_opt) = runs
    for a, b in zip(ref_opt._log_scales, fast_opt._log_scales):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", DEGENERATE)
def test_fast_step_equals_reference_on_degenerate_orbits(case, base):
    torch.manual_seed(0)
    model = DEGENERATE[case]()
    worst, _ = deviation(model, make_batches(model, STEPS), classification_loss, base=base, lr=1e-2,
                         **BASES[base])
    assert worst <= TOLERANCE, f"{case}/{base}: fast vs reference {worst:.2e}"


@pytest.mark.parametrize("base", BASES)
def test_fast_step_equals_reference_with_dead_mode_free(base):
    torch.manual_seed(0)
    model = TinyTransformer(mlp="swiglu").double()
    worst, _ = deviation(model, make_batches(model, STEPS), classification_loss, base=base, lr=1e-2,
                         dead_mode="free", **BASES[base])
    assert worst <= TOLERANCE


@pytest.mark.parametrize("base", BASES)
def test_fast_step_equals_reference_on_a_deep_relu_chain(base):
    """Every hidden layer sits in two unit gauges: the conjugate-gradient solve is coupled."""
    torch.manual_seed(0)
    model = ReluChain(depth=12).double()
    worst, _ = deviation(model, make_batches(model, STEPS), classification_loss, base=base, lr=1e-2,
                         **BASES[base])
    assert worst <= TOLERANCE


class PackedAttention(nn.Module):
    """nn.MultiheadAttention (packed in_proj slices) with a norm in front and a readout."""

    def __init__(self, vocab=11, width=8, heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.readout = nn.Linear(width, vocab)

    def forward(self, x):
        h = self.norm(self.embed(x))
        return self.readout(self.attn(h, h, h, need_weights=False)[0])

    def gauges(self):
        return [HeadRotation.packed(self.attn), HeadRotationVO.packed(self.attn)]


def packed_attention_batches():
    """``STEPS`` token batches for :class:`PackedAttention` (vocabulary 11)."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 11, (3, 5), generator=g), torch.randint(0, 11, (3, 5), generator=g))
            for _ in range(STEPS)]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", ["rope-half", "packed-attention", "no-gauges"])
def test_fast_step_equals_reference_elsewhere(case, base):
    torch.manual_seed(0)
    if case == "rope-half":
        model = TinyTransformer(mlp="swiglu", rope="half").double()
    elif case == "packed-attention":
        model = PackedAttention().double()
    else:
        model = ReluMLP().double()
    gauges = (lambda m: []) if case == "no-gauges" else None
    batches = packed_attention_batches() if case == "packed-attention" else make_batches(model, STEPS)
    with pytest.warns(UserWarning, match="no gauges") if case == "no-gauges" else _nothing():
        worst, _ = deviation(model, batches, classification_loss, gauges=gauges, base=base, lr=1e-2,
                             **BASES[base])
    assert worst <= TOLERANCE, f"{case}/{base}: fast vs reference {worst:.2e}"


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("rotation_solve", ["eigh", "cg"])
def test_fast_step_equals_reference_on_grouped_query_attention(base, rotation_solve):
    """Every gauge find_gauges proves on the GQA block (structure_models.LlamaBlockLM: query/key
    pair rotations shared by a group under RoPE's half layout, value/output rotations shared
    by a group on a fused key/value projection, per-pair query/key scales, norm gains, a
    SwiGLU unit scale): the batched step stacks the shared rotations with offset shares into
    one solve per batch, the reference solves each gauge alone."""
    from ddc import find_gauges
    from structure_models import ZOO, lm_loss

    model, example, loss, _, batches = ZOO["llama_block"]()
    model = model.double()
    found = list(find_gauges(model, example, loss=loss, log=False))
    assert {"GroupedHeadRotation", "GroupedHeadRotationVO", "QKPairScale"} <= {type(g).__name__ for g in found}
    on_copy = lambda m: copy.deepcopy(found, {id(p): q for p, q in zip(model.parameters(), m.parameters())})
    worst, _ = deviation(model, batches[:STEPS], lm_loss, gauges=on_copy, base=base, lr=1e-2, weight_decay=0.1,
                         rotation_solve=rotation_solve, **BASES[base])
    assert worst <= (TOLERANCE if base == "adam" else MUON_SVD_TOLERANCE), f"GQA/{base}: {worst:.2e}"


ROTATION_CASES = ["gpt-swiglu-rope-layernorm", "gpt-relu-norope-rmsnorm", "vit", "grok"]


@pytest.mark.parametrize("case", ROTATION_CASES + ["packed-attention"] + list(DEGENERATE))
def test_cg_rotation_solve_equals_reference(case, cifar_root):
    """``rotation_solve="cg"``: the so(d) projections by CG in an earlier eigenbasis give
    the reference step (which uses eigh) to round-off, and CG did run (after the first
    step's eigh)."""
    if case == "packed-attention":
        torch.manual_seed(0)
        model = PackedAttention().double()
        worst, runs = deviation(model, packed_attention_batches(), classification_loss, lr=1e-2,
                                rotation_solve="cg")
        worst = _without_key_bias(runs)
    elif case in DEGENERATE:
        torch.manual_seed(0)
        model = DEGENERATE[case]()
        worst, runs = deviation(model, make_batches(model, STEPS), classification_loss, lr=1e-2,
                                rotation_solve="cg")
    else:
        model, batches = float64_case(case, cifar_root, STEPS)
        worst, runs = deviation(model, batches, logits_loss, lr=1e-3, weight_decay=0.1, rotation_solve="cg")
    opt = runs[1][1]
    ages = [int(st[k]) for st in opt.state.values() for k in st if str(k).startswith("ddc_rotation_age")]
    assert worst <= TOLERANCE, f"{case}: fast (cg) vs reference {worst:.2e}, basis ages {ages}"
    wide = [g for g in opt._frame.rotation_gauges if g.block > 2]
    if wide:  # CG ran: the bases were taken at the first step and used for the others
        assert ages and min(ages) == STEPS, ages


def _without_key_bias(runs):
    """The deviation with the key slice of ``in_proj_bias`` compared on its own.

    The key bias is a dead coordinate: it shifts every logit of a query alike, so its
    gradient is zero but for round-off, and Adam divides that round-off by ``eps`` into
    steps of about 1e-12 (measured: 5e-12 after 4 steps in both paths). The two paths'
    round-off differs in the last bit (the so(d) projection's CG and the reference's eigh
    agree to 2e-15), so their key biases differ by about their size, 1e-12, which is
    2.6e-11 of the bias's largest (query/value) entry. Both must stay at round-off
    level; every other coordinate must agree to ``TOLERANCE``."""
    (ref, _), (fast, _) = runs
    worst = 0.0
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        a, b = a.detach(), b.detach()
        if name == "attn.in_proj_bias":
            width = a.numel() // 3
            key = slice(width, 2 * width)
            assert a[key].abs().max() <= 1e-10 and b[key].abs().max() <= 1e-10
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)))
    return worst


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("base", BASES)
def test_fast_step_matches_reference_with_bfloat16_parameters(base):
    torch.manual_seed(0)
    model = TinyTransformer(mlp="swiglu").to(torch.bfloat16)
    batches = make_batches(model, STEPS)
    worst, _ = deviation(model, batches, classification_loss, base=base, lr=1e-2, **BASES[base])
    assert worst <= BF16_TOLERANCE, f"bf16/{base}: fast vs reference {worst:.2e}"


def test_frozen_member_falls_back_to_the_reference_path():
    """A gauged parameter without a gradient (or in an lr-0 group) takes the reference
    step; the result is still the reference's."""
    torch.manual_seed(0)
    model = TinyTransformer(mlp="relu", rope=None).double()
    model.down.weight.requires_grad_(False)
    batches = make_batches(model, STEPS)
    worst, _ = deviation(model, batches, classification_loss, lr=1e-2)
    assert worst <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("foreach", [True, False])
def test_compiled_step_runs_and_matches_eager(foreach):
    """``torch.compile(opt.step)`` on a model with every gauge kind runs from the first step
    (which graph-breaks at the host reads of the first step's adaptive balancing solve and
    the reference path's step counters, and falls back to eager there) and gives the eager
    step's parameters. Slow: compiling takes ~40 s."""
    torch.manual_seed(0)
    model = TinyTransformer(mlp="swiglu")
    batches = make_batches(model, 2)
    results = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        opt = DDC(m, foreach=foreach, lr=1e-2)
        step = torch.compile(opt.step) if compiled else opt.step
        for batch in batches:
            opt.zero_grad()
            classification_loss(m, batch)[0].backward()
            step()
        results.append([p.detach().clone() for p in m.parameters()])
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


#: DDC(compile=True) against the eager batched step, float64: the kernels are the same code,
#: the compiler may fuse and reorder their arithmetic (round-off; measured on GPT tiny, 6
#: steps, one thread: 9.5e-16 for Adam, 6.8e-14 for Muon with the exact polar factor, which
#: amplifies last-bit differences as in MUON_SVD_TOLERANCE).
COMPILED_TOLERANCE = 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("base,rotation_solve", [("adam", "eigh"), ("muon", "eigh"), ("adam", "cg")])
def test_compile_option_matches_eager_and_does_not_recompile(base, rotation_solve, cifar_root):
    """``DDC(compile=True)`` computes the eager batched step's parameters (float64, GPT
    tiny with every gauge kind of the task model, both bases, both rotation solves: with
    ``cg`` the so(d) projections' fixed CG runs inside the kernel), under an lr that changes
    every step (a scheduler), and compiles only in its first steps: the numbers that change
    every step reach the kernels as tensors, not as constants that would force a
    recompilation each step. Slow: compiling the kernels takes about a minute."""
    import torch._dynamo.utils

    model, batches = float64_case("gpt-swiglu-rope-layernorm", cifar_root, 6)
    runs, graphs = [], []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        opt = DDC(m, base=base, lr=1e-3, weight_decay=0.1, balance_tol=1e-14, compile=compiled,
                  rotation_solve=rotation_solve, **BASES[base])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for k, batch in enumerate(batches):
            opt.zero_grad()
            logits_loss(m, batch)[0].backward()
            opt.step()
            schedule.step()
            if compiled and k >= 2:
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        runs.append(m)
    torch._dynamo.reset()
    worst = 0.0
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        scale = a.detach().abs().max().clamp_min(1e-300)
        worst = max(worst, float((a.detach() - b.detach()).abs().max() / scale))
    assert worst <= COMPILED_TOLERANCE, f"compiled step deviates by {worst:.2e}"
    assert len(set(graphs)) == 1, f"recompiled after the warm-up steps: graph counts {graphs}"
