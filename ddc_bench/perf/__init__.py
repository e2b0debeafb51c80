"""``ddc-bench-perf``: what each optimizer costs, per task model, measured on this machine.

    ddc-bench-perf                                   # gpt_lm small on the CPU, 1 thread
    ddc-bench-perf --tasks gpt_lm,grok_modadd --size tiny --steps 20 --out /tmp/perf
    ddc-bench-perf --device cuda --size paper --threads 0
    ddc-bench-perf --profile ddc                     # also torch.profiler's table of DDC's step

For each task model (built from its size preset through ``tasks.build_task``) and each
optimizer (``--optimizers``, any name of ``ddc_bench.optimizers.registry()``), plus the
reference: torch's AdamW with ``foreach=True`` on the CPU (row ``adamw_foreach``) or
``fused=True`` on CUDA (row ``adamw_fused``), with ``configs/optimizer/adamw.yaml``'s
hyperparameters:

* **step ms**: ``optimizer.step()``, median over ``--steps`` steps after ``--warmup``
  steps. Every optimizer has its own copy of the model (same initialisation) and all of
  them train side by side, round-robin (the order rotates each round), so machine noise
  hits all alike. CUDA is synchronised before each clock read.
* **train step ms**: ``zero_grad`` + forward + backward + step, median over the same steps.
* **state bytes**: every tensor in ``optimizer.state_dict()`` (``optimizer.state``, plus
  extra state such as DDC's per-gauge log-scales).
* **ops/step**, **syncs/step**, **scalar reads/step**: aten operators dispatched by one
  ``optimizer.step()``, the host-device synchronisations among them and the scalar reads
  (``.item()``-like), counted by a ``TorchDispatchMode`` over 4 steps after the timing
  (:mod:`ddc_bench.perf.ops`). Launch overhead scales with the operators; every
  synchronisation stalls the host until the device catches up.
* **peak MiB**: the peak memory while a fresh model and optimizer run 3 training steps;
  one optimizer at a time, before the timing. CUDA: ``torch.cuda.max_memory_allocated``
  (tensor memory: model, gradients, activations, state, temporaries, the cached batches).
  CPU: there is no tensor-level counter, so it is the peak resident set (``VmHWM``) of a
  fresh Python process per optimizer that builds the task, the model and the optimizer and
  runs the steps (a process that already freed memory would reuse it and hide the growth).
  That includes Python, torch and the task's data, the same for every optimizer: read the
  difference to the reference (**peak Δ MiB**), not the absolute value.

Ratios are to the reference row; ``vs base`` compares a DDC variant with its base
(``ddc`` with the reference AdamW, ``ddc_muon`` with ``muon``).

**Scaling** (``--scale``): ``optimizer.step()`` time of the reference AdamW and DDC over
model sizes of ``--scale-task`` (default GPT tiny, small, and small with the width doubled:
about 4x the parameters). Here the gradients of one real batch are computed once per model
and the steps are timed on them (the step's cost does not depend on the gradient values),
so large models stay cheap to measure.

**Harness overhead** (``--overhead-steps``): the runner's training step against a bare
loop of the same model, optimizer (with the options the runner resolves) and batches. The
runner's step is what its ``step_time_ms`` times: the next batch,
:func:`ddc_bench.train.train_step` (forward, backward, step, schedule, zero_grad, loss read
back) and the finiteness check of the parameters, with the plan ``ddc-bench`` composes for
the task and optimizer (``grad_clip`` off: clipping is part of a training recipe). The
bare loop: next batch, zero_grad, forward, backward, step. Two model copies are stepped
alternately (the order swaps every step), ``--warmup`` + ``--overhead-steps`` steps each,
and the medians are compared.

Outputs (``--out``, default a new folder ``results/perf/<device>-<size>-<UTC time>``): ``report.md`` (all tables and how they were
measured), ``steps.csv``, ``steps.png``, ``scaling.csv``, ``scaling.png``, ``overhead.csv``
and, with ``--profile``, ``profile-<name>.txt``. Existing files are never overwritten:
the command stops with one line instead. Every number is measured now; nothing is
hard-coded.

The package: :mod:`~ddc_bench.perf.cli` (the command), :mod:`~ddc_bench.perf.setup`
(configs, tasks, optimizers), :mod:`~ddc_bench.perf.steps` (timed steps, round-robin),
:mod:`~ddc_bench.perf.measure` (the measurements), :mod:`~ddc_bench.perf.ops` (operator
and synchronisation counts), :mod:`~ddc_bench.perf.memory` (peak memory, in a fresh
process on the CPU), :mod:`~ddc_bench.perf.charts` and :mod:`~ddc_bench.perf.report`.
"""


from ddc_bench.perf.cli import main, run_perf
from ddc_bench.perf.setup import TASK_NAMES, PerfError, build_named_optimizer

__all__ = ["main", "run_perf", "PerfError", "TASK_NAMES", "build_named_optimizer"]
