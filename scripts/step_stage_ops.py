"""Where the batched DDC step's operators and time go, stage by stage: each stage of
the batched step (``ddc.step_batched``'s kernels, and the parts of ``middle``), the per-step numbers (``_spec``)
and the plain parameters' base step, counted with ``tests/ddc_models.StepCounter`` (not
views) over 5 steps after 3 on GPT ``small`` (timings include the counter's overhead: read
them as shares). Usage::

    PYTHONPATH=.:tests OMP_NUM_THREADS=1 python scripts/step_stage_ops.py ddc
"""
import collections
import sys
import time
import warnings

import torch
torch.set_num_threads(1)
from ddc_bench.perf import setup as perf
import ddc.step_batched as SB
from ddc_models import StepCounter
task = perf.build_task_or_fail(perf.task_config("gpt_lm", "small"))
batches = perf.take_batches(task, torch.device("cpu"), 8)
name = sys.argv[1] if len(sys.argv) > 1 else "ddc"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    setup = perf.make_setup(task, name, torch.device("cpu"))
opt = setup.optimizer
stats = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
counting = [False]
def wrap(key, fn):
    def inner(*a, **k):
        if not counting[0]:
            return fn(*a, **k)
        c = StepCounter(); t = time.perf_counter()
        with c:
            out = fn(*a, **k)
        s = stats[key]; s[0] += c.compute; s[1] += time.perf_counter() - t; s[2].update({k2: v for k2, v in c.ops.items()})
        return out
    return inner
# The stages by their module names (``fixed`` and ``after_frame``, the kernels, call them
# there); the table of kernels rebuilt from the wrapped functions, so the first step's
# halves are counted too.
for stage in ("_prepare", "_middle", "_rebalance_start", "_balance", "_write_back"):
    setattr(SB, stage, wrap(stage.lstrip("_"), getattr(SB, stage)))
SB.KERNELS = SB.Kernels(SB._fixed_step, SB._prepare, SB._after_frame)
SB._spec = wrap("spec", SB._spec)
SB.multi_tensor_base_step = wrap("plain", SB.multi_tensor_base_step)
import ddc.step as ST
ST.multi_tensor_base_step = SB.multi_tensor_base_step
SB._canonical = wrap("  canonical", SB._canonical)
SB._base_directions = wrap("  base_directions", SB._base_directions)
SB._remove_dead = wrap("  remove_dead", SB._remove_dead)
for k, b in enumerate(batches):
    opt.zero_grad(set_to_none=True); task.loss(setup.model, b)[0].backward()
    counting[0] = k >= 3
    t = time.perf_counter()
    if k >= 3:
        c = StepCounter()
        with c: opt.step()
        stats["TOTAL"][0] += c.compute; stats["TOTAL"][1] += time.perf_counter() - t
    else:
        opt.step()
n = len(batches) - 3
for key, (ops, sec, top) in stats.items():
    print(f"{key:20s} ops/step {ops / n:7.0f}  ms/step {1000 * sec / n:7.2f}  top {top.most_common(5)}")
