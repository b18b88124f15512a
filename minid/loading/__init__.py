"""Weights: safetensors headers and tensors, the hub <-> single-file key map, loading the published
SD1.4 files into the models, and the verified download and pickle conversion.

Reading order: tensorfile, keymap, checkpoint, download.
"""
