"""The CPU-scale benchmark: procedural shapes, a tiny text encoder and a tiny UNet."""
