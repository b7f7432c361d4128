"""Foundations every other layer may use: errors, atomic writes, memory, native kernels, dtypes, paths."""
