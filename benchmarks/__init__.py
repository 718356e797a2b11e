"""Benchmarks run against the real platform (see ``make bench-*``); not part of the test suite."""
