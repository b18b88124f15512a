"""Sampling math: the noise schedule, the samplers (DDIM, DPM-Solver++), solver plans and the hybrid
plan, SD's classifier-free-guided loops, text to image, and the exact-score testbed.

Reading order: schedule, samplers, plans, hybrid, guided, text_to_image, toy.
"""
