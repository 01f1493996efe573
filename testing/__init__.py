"""Testing support shared by tests, the demo and the benchmarks (outside the pipeline/trainer layers)."""
