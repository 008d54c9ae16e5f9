"""Training: typed config, data, losses, the UNet-feature discriminator and the trainer."""
