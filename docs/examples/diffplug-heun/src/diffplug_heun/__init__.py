"""Heun's method (Karras et al. 2022, Algorithm 1) as a third-party diffplug plugin."""
