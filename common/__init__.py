"""Data attribution for text-to-image diffusion models by unlearning synthesized images."""
