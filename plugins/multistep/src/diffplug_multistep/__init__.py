"""The multistep and newer solvers of ComfyUI's sampler set, for diffplug."""
