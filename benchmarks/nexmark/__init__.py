"""Nexmark on microstream: generator, queries (each with a one-shot Polars oracle), peers.

Import as ``nexmark`` with ``benchmarks/`` on ``sys.path`` (the scripts and the
test suite do this).
"""
