"""Benchmarks for inference-proxy: simulated backend, load generators, scenarios, report."""
