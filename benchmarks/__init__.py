"""Benchmarks of fusedrnn against torch.nn (run: python -m benchmarks.bench)."""
