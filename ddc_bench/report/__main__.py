"""``python -m ddc_bench.report PATH``: the same as ``ddc-bench-report PATH``."""

import sys

from ddc_bench.report.build import main

sys.exit(main())
