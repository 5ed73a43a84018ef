"""Shared fixtures for the pytest-benchmark suites (run with `make bench`)."""
