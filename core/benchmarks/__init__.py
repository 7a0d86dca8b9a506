"""Benchmarks run by ``metareason bench <name>``; results are written under bench/results/."""
