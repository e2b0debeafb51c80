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

from ddc import DDC
from ddc_models import ReluChain, TinyTransformer, classification_loss, make_batches

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
