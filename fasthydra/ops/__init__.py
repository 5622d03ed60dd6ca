"""Launchers and autograd Functions, one file per op; the only importers of fasthydra.kernels.

Triton is imported lazily inside the launchers, so the torch path works where Triton is absent.
"""
