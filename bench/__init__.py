"""Benchmarks of zeroserve; each is a script (`python bench/<name>.py`) sharing `bench.common`."""
