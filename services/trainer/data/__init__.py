"""Dataset readers for the training tasks: image folders, FITS frames, the sky manifest, epoch order."""
