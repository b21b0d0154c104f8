"""Benchmarks for gpuqueue: ``python -m bench`` runs the prefetch-depth sweep.

Nothing here is imported by the package or run by the tests (except a smoke
run of the sweep with tiny sizes).
"""
