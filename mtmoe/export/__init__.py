"""Standalone inference artifacts (safetensors + JSON) made from training checkpoints."""
