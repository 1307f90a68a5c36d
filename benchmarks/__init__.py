"""flowstate benchmarks (issue 4). Run them with ``python -m benchmarks.run`` from the repo root."""
