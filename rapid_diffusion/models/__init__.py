"""Models: where checkpoints come from and how they become loadable diffusers folders."""
