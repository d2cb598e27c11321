"""RL-agnostic generative core (schedules, EDM, denoisers, samplers). Must not import RL layers.

Empty until the diffusion-core issue lands; it is a layer of the import contract already."""
