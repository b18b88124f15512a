"""Faces: the detection, landmark and identity models (insightface's packs), and ConsistentID's
fine-grained facial regions.

Reading order: analyzer, regions.
"""
