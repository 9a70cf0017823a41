"""Benchmarks: each module runs with ``python -m benchmarks.<name>`` and compares against a
named baseline in the same run.  Never imported by the package or collected by the tests."""
