"""fasthydra.kernels: device code only (@triton.jit functions). Installed from the repo's kernels/ folder.

Nothing here imports torch; the launchers in fasthydra.ops are the only importers.
"""
