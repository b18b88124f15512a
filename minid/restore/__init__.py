"""The user-facing restore: its config, the checked inputs of a pair, the pipeline over a
StableDiffusion, several faces per image, and the files of a result.

Reading order: config, inputs, pipeline, multiface, report.
"""
