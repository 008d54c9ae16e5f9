"""Ports of the official OSDiff networks (cheesejiang/OSDiff, commit 2d772c1)."""
from .cddm import CDDMControl, controlled_unet_forward
from .lfgcm import OfficialLFGCM

__all__ = ["CDDMControl", "OfficialLFGCM", "controlled_unet_forward"]
