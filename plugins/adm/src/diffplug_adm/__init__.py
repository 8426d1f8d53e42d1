"""Decoupled diffusion ("ADM", analytic image attenuation; Huang et al. 2023, arXiv 2306.13720).

Not OpenAI's guided-diffusion model of the same acronym.
"""
