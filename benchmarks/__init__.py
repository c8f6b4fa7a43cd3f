"""Benchmark harness for focal-kernels: `python -m benchmarks --help`.

Importing this package prepares the process first: on a machine without CUDA it switches on Triton's
interpreter (TRITON_INTERPRET=1) unless the variable is already set, before anything imports triton or
focal_kernels, so the kernels themselves run (slowly) on the CPU.
"""

from .environment import prepare_environment

prepare_environment()
