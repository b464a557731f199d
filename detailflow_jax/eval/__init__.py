"""Evaluation: FID Inception-v3, FID / sFID / precision-recall, PSNR / SSIM.

Import from the submodules (fid.fid, precision_recall.precision_recall, ...): re-exporting the
functions here would shadow the submodules of the same name.
"""
