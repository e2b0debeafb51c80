"""``python -m ddc_bench.perf``: the ``ddc-bench-perf`` command."""

from ddc_bench.perf.cli import main

main()
