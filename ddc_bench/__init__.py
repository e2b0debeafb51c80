"""The ddc-bench harness: command line, training loop, results and reports."""
