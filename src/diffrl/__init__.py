"""diffrl: sample-efficient reinforcement learning with diffusion models.

Five published systems (SynthER, ITER-Diffusion, DiffPPO, DPPO, Dydiff) on one shared core.
See DESIGN.md in the repository for the layers and contracts.
"""

__version__ = "0.1.0"
