"""Imagen for diffplug: text conditioners, an Efficient U-Net and the cascade pipeline."""
