"""The denoising UNet fused with its ControlNet-XS adapter, for latents of any channel count.

diffusers' `UNetControlNetXSModel` and `ControlNetXSAdapter` build their input and output
convolutions for 4 latent channels (SD's). `ControlledUNet` is the same model with
`latent_channels` in its config: base conv_in / conv_out and the control branch's conv_in are
built for that many channels (32 for the TAEF2 latent of osdiff-tiny v2). With 4 channels it is
exactly diffusers' model.
"""
from __future__ import annotations

import contextvars
import inspect

from diffusers import ControlNetXSAdapter, UNet2DConditionModel, UNetControlNetXSModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up in this module)
from torch import nn

_CHANNELS_FROM_UNET: contextvars.ContextVar[int | None] = contextvars.ContextVar("channels", default=None)


class ControlledUNet(UNetControlNetXSModel):
    """UNetControlNetXSModel with `latent_channels` (B,C,h,w) latents instead of a fixed 4."""

    def __init__(self, latent_channels: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)  # diffusers' __init__ registers its own arguments
        channels = latent_channels or _CHANNELS_FROM_UNET.get() or 4
        if channels != 4:
            base, ctrl = self.base_conv_in.out_channels, self.ctrl_conv_in.out_channels
            self.base_conv_in = nn.Conv2d(channels, base, kernel_size=3, padding=1)
            self.ctrl_conv_in = nn.Conv2d(channels, ctrl, kernel_size=3, padding=1)
            self.base_conv_out = nn.Conv2d(self.base_conv_out.in_channels, channels, kernel_size=3, padding=1)
        self.in_channels = channels
        self.register_to_config(latent_channels=channels)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, controlnet: ControlNetXSAdapter | None = None, **kwargs):
        """diffusers' `from_unet`, with the latent channel count taken from `unet`."""
        channels = int(unet.config.in_channels)
        if controlnet is not None and controlnet.conv_in.in_channels != channels:
            old = controlnet.conv_in
            controlnet.conv_in = nn.Conv2d(channels, old.out_channels, kernel_size=3, padding=1)
        token = _CHANNELS_FROM_UNET.set(channels)
        try:
            return super().from_unet(unet, controlnet, **kwargs)
        finally:
            _CHANNELS_FROM_UNET.reset(token)

# diffusers reads a model's config keys from its __init__ signature: the parent's plus ours
_PARENT = inspect.signature(UNetControlNetXSModel.__init__)
ControlledUNet.__init__.__signature__ = _PARENT.replace(parameters=[
    *_PARENT.parameters.values(),
    inspect.Parameter("latent_channels", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
])

__all__ = ["ControlledUNet"]
