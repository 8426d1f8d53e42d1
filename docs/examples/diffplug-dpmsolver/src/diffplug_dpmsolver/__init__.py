"""DPM-Solver++(2M) (Lu et al. 2022) as a third-party diffplug plugin."""
