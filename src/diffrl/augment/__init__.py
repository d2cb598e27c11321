"""Producers of extra experience (SynthER generator, KER/GER, episode generator, Dydiff rollouts).

Empty until the SynthER and ITER issues land; it is a layer of the import contract already."""
