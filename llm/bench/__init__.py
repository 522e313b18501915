"""Benchmark suites behind `llm bench {kernels,train,memory,data}`.

Each suite prints a table, writes JSON (with the hardware, versions and the
command) under benchmarks/results/ or --out, and may draw a PNG.
"""
