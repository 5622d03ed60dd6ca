"""Launchers and forwards, one file per op, and their custom ops (library.py); the only importers of
fasthydra.kernels.

Triton is imported lazily inside the launchers, so the torch path works where Triton is absent.
"""
