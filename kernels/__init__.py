"""Triton kernels: routed_attention.py (top-k history routing, forward and backward) and its benchmark."""
