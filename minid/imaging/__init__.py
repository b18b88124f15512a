"""Pictures and regions: image files and tensors, masks, face crops and the warps between frames,
and the image metrics (PSNR, SSIM, ID-Sim).

Reading order: images, masks, crops, metrics.
"""
