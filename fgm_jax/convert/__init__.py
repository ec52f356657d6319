"""Weight conversion: diffusers/PyTorch safetensors <-> Flax params trees, both ways."""
