"""gpubake.kernels"""
