"""Run infrastructure: run directory, logger, checkpoints, seeding, device, progress, reports."""
