"""Benchmarks: scripts run as `python -m benchmarks.<name>` that print a table and write JSON.

They measure; they are not tests (no assertions on speed). See benchmarks/README.md.
"""
