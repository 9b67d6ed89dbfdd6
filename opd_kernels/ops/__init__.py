"""Launchers of the fused-linear Triton backend while it moves to opd_kernels.backends."""
