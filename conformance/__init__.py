"""Numerical conformance of diffusion-model components (see README.md)."""
