"""Benchmarks, run as scripts (`.venv/bin/python bench/grpc.py`); nothing imports them.

This file makes `bench` a package for the type checker only: without it mypy names
`bench/grpc.py` and `bench/dataflow.py` after their file names (`grpc`, `dataflow`), and
they then shadow the real packages for every other file checked in the same run.
"""
