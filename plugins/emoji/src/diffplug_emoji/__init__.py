"""Noto Emoji as a diffplug data set (``--data emoji``): 3786 64x64 RGB images on white,
each with its code points, names, category and captions."""
