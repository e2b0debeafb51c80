"""``ddc-bench-report PATH``: aggregate the finished runs under PATH into tables and plots.

Writes, next to the runs (every file atomically; all of them are derived, so they are
regenerated on each call; run folders are only ever read):

* ``PATH/summary.csv``  one row per finished run (the flattened ``summary.json``);
* ``PATH/report.md``    per task: each optimizer's *selected* setting (best mean final
  validation metric over seeds) with mean ± std, a 95% confidence interval and a Welch
  t-test against the best optimizer; a table of all settings; diverged runs; plots; then,
  across tasks, AlgoPerf-style time/steps to target and a performance profile with its
  area; and a list of runs skipped because they could not be read;
* ``PATH/summary.tex``  the same tables as LaTeX (``booktabs`` and ``graphicx``);
* ``PATH/plots/*.png``  per task, learning curves of the selected settings and final
  metric against effective learning rate; ``performance_profile.png`` across tasks.

Where each part lives:

* :mod:`~ddc_bench.report.loading`    the runs as one table; unreadable runs skipped;
* :mod:`~ddc_bench.report.selection`  aggregation over seeds and the selection rule;
* :mod:`~ddc_bench.report.stats`      mean/std/95% CI over seeds, Welch's t-test;
* :mod:`~ddc_bench.report.tables`     the tables and their Markdown/LaTeX;
* :mod:`~ddc_bench.report.plots`      learning curves and lr sensitivity;
* :mod:`~ddc_bench.report.profile`    time to target and performance profiles;
* :mod:`~ddc_bench.report.build`      :func:`build_report` and the command.

Which metrics are better when higher is decided in one place,
:func:`ddc_bench.results.higher_is_better`; the results layout is known only to
:mod:`ddc_bench.results`.
"""

from ddc_bench.report.build import (PLOTS_DIR, REPORT_MD, SUMMARY_CSV, SUMMARY_TEX,
                                    NoFinishedRunsError, ReportError, build_report, main)
from ddc_bench.report.loading import load_runs

__all__ = ["build_report", "main", "load_runs", "ReportError", "NoFinishedRunsError",
           "PLOTS_DIR", "REPORT_MD", "SUMMARY_CSV", "SUMMARY_TEX"]
