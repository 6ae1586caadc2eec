"""Offline operations on networks and checkpoints: merge, bake, LoRA export."""
