"""EditedID (paper 001) over tensors: attention control and stores, prompt-to-prompt, the gating of
Stage 3, adaptive-mixing inversion (Stage 1), null-text optimisation (Stage 2), and the method that
joins them.

Reading order: control, prompt_to_prompt, gating, mixing, null_text, editedid.
"""
