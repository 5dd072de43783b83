"""Backbones: what carries messages between the instances of the bus."""
