"""SD1.4 itself: the configs, the CLIP tokenizer and text encoder, the UNet, the VAE, and the
attention seam every attention call of the UNet goes through.

Reading order: config, tokenizer, clip, attention, unet, vae.
"""
