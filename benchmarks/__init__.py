"""spectral_ext benchmarks: `python -m benchmarks` (or `make bench`) prints the comparison table."""
