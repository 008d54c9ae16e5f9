"""Image quality measures shared by training and evaluation (a lower layer: it imports
neither): pixel metrics, LPIPS, DISTS and the Inception-v3 FID network, with their pretrained
weights found locally (`osdiff.quality.backbones`)."""
