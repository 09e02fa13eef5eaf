"""The benchmark (tools/benchmark.py): its cases, the worker that measures one, and the report."""
