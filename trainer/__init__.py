"""The run: config, budget, training loop, evaluation, readout and the `vit-train` entry point."""
