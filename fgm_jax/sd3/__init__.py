"""Stable Diffusion 3 from a local diffusers folder, in JAX: prompt encoding (text.py)."""
