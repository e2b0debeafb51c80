"""``torch.compile(opt.step, fullgraph=True)`` traces the whole DDC step without a graph
break once the frame is initialised (the first step, state init, solves it adaptively with
host reads and runs eagerly), and the traced step equals the eager one in float64. With
``rotation_solve="cg"`` the refresh schedule's flag is a tensor when traced and the step
branches with ``torch.cond``.

The graph is checked with the ``aot_eager`` backend (the traced graph run by eager kernels,
through AOTAutograd): the tracing is the subject here, and inductor's C++ compilation of
the whole step takes minutes on a CPU (measured: ``scripts/explain_step.py``)."""

import copy

import pytest
import torch

import torch.nn.functional as F

from ddc import DDC
from ddc.verify import rebind
from ddc_models import ReluChain, TinyTransformer, classification_loss, make_batches
from task_models import CASES as TASK_CASES
from task_models import float64_case

MODELS = {
    "relu-chain": lambda: ReluChain(depth=4).double(),
    "transformer-rope": lambda: TinyTransformer(rope="interleaved", mlp="swiglu", bias=False).double(),
    "transformer-norope-relu": lambda: TinyTransformer(rope=None, mlp="relu", norm="rmsnorm", bias=False).double(),
}
# (No biases: the key bias is a dead coordinate whose round-off Adam divides by eps, so any
# two computations of the step differ there by ~1e-12 of the bias: test_ddc_foreach._without_key_bias.)
CASES = [("relu-chain", "adam", "eigh"), ("transformer-rope", "adam", "eigh"), ("transformer-rope", "muon", "eigh"),
         ("transformer-norope-relu", "adam", "cg")]


@pytest.mark.parametrize("name,base,rotation_solve", CASES)
def test_fullgraph_step_equals_eager(name, base, rotation_solve):
    torch.manual_seed(0)
    model = MODELS[name]()
    batches = make_batches(model, 5)
    runs = []
    torch._dynamo.reset()
    for compiled in (False, True):
        m = copy.deepcopy(model)
        opt = DDC(m, base=base, lr=1e-2, weight_decay=0.1, rotation_solve=rotation_solve,
                  rotation_refresh_every=2,   # cg: refreshes at steps 3 and 5, traced (torch.cond)
                  **({"orthogonalizer": "svd"} if base == "muon" else {}))
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for k, batch in enumerate(batches):
            opt.zero_grad()
            classification_loss(m, batch)[0].backward()
            (step if k >= 1 else opt.step)()   # the first step (state init) eagerly
        runs.append(m)
    torch._dynamo.reset()
    worst = max(float((a.detach() - b.detach()).abs().max() / a.detach().abs().max().clamp_min(1e-300))
                for a, b in zip(runs[0].parameters(), runs[1].parameters()))
    assert worst <= 1e-12, f"{name}/{base}/{rotation_solve}: fullgraph vs eager {worst:.2e}"


def _fullgraph_deviation(model, batches, loss_fn, gauges=None, **options) -> float:
    """The largest relative difference between the eager step and
    ``torch.compile(opt.step, fullgraph=True)`` (``aot_eager``) after ``len(batches)``
    steps on copies of ``model`` (the first step eagerly: state init)."""
    runs = []
    torch._dynamo.reset()
    for compiled in (False, True):
        m = copy.deepcopy(model)
        opt = DDC(m, gauges=rebind_gauges(gauges, model, m), lr=1e-3, weight_decay=0.1, **options)
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for k, batch in enumerate(batches):
            opt.zero_grad()
            loss_fn(m, batch)[0].backward()
            (step if k >= 1 else opt.step)()
        runs.append(m)
    torch._dynamo.reset()
    return max(float((a.detach() - b.detach()).abs().max() / a.detach().abs().max().clamp_min(1e-300))
               for a, b in zip(runs[0].parameters(), runs[1].parameters()))


def _logits_loss(model, batch):
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1)), logits


def rebind_gauges(gauges, source, target):
    """``gauges`` found on ``source``, declared on its copy ``target`` (None: DDC finds its own)."""
    if gauges is None:
        return None
    return rebind(list(gauges), source, target)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["adam", "muon"])
@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_fullgraph_step_equals_eager_on_task_models(case, base, cifar_root):
    """Issue 17's target: the whole step traces with ``fullgraph=True`` on every task model
    (tiny, float64, the task's declared gauges) and equals the eager step."""
    model, batches = float64_case(case, cifar_root, 3)
    worst = _fullgraph_deviation(model, batches, _logits_loss, base=base,
                                 **({"orthogonalizer": "svd"} if base == "muon" else {}))
    assert worst <= 1e-12, f"{case}/{base}: fullgraph vs eager {worst:.2e}"


@pytest.mark.slow
def test_fullgraph_step_equals_eager_on_hf_gpt2():
    """The same on GPT-2 from ``transformers`` (built from a config), with the gauges
    ``find_gauges`` proves on it."""
    pytest.importorskip("transformers")
    from structure_models import ZOO

    from ddc import find_gauges
    model, example, loss, loss_fn, batches = ZOO["hf_gpt2_zero_mlp"]()
    model = model.double()
    batches = batches[:3]   # token batches
    found = find_gauges(model, example, loss=loss, log=False)
    worst = _fullgraph_deviation(model, batches, loss_fn, gauges=found)
    assert worst <= 1e-12, f"hf_gpt2: fullgraph vs eager {worst:.2e}"
