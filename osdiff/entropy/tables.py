"""Saving compressai's integer CDF tables next to a model's weights.

compressai computes the tables with `update()`; recomputing them at load could differ by an
ulp between machines and derail every file. So `save_pretrained` stores them
(`entropy_tables.safetensors`) beside the diffusers weights and `from_pretrained` restores
them, and they are kept out of the state dict (their sizes vary with the weights).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from compressai.entropy_models import EntropyModel, GaussianConditional
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ENTROPY_TABLES_FILE = "entropy_tables.safetensors"
_TABLE_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")
_SHARED_GAUSSIAN = "gaussian_conditional"


class EntropyTablesMixin:
    """For a diffusers `ModelMixin` holding compressai entropy models: call
    `keep_tables_out_of_state_dict()` at the end of `__init__`; override `after_load()`
    for work that must follow loading weights."""

    def keep_tables_out_of_state_dict(self) -> None:
        for module in self.modules():
            if isinstance(module, EntropyModel):
                module._non_persistent_buffers_set.update(b for b in _TABLE_BUFFERS if b in module._buffers)

    def entropy_tables(self) -> dict[str, Tensor]:
        """Integer CDF tables of every entropy model, keyed by module path. All Gaussian
        conditionals share one scale table, so their identical tables are stored once."""
        tables: dict[str, Tensor] = {}
        gaussian: dict[str, Tensor] | None = None
        for name, module in self.named_modules():
            if not isinstance(module, EntropyModel):
                continue
            own = {
                b: module._buffers[b].detach().cpu().contiguous()
                for b in _TABLE_BUFFERS
                if module._buffers.get(b) is not None and module._buffers[b].numel() > 0
            }
            if isinstance(module, GaussianConditional):
                if gaussian is None:
                    gaussian = own
                    tables.update({f"{_SHARED_GAUSSIAN}.{b}": t for b, t in own.items()})
                elif own.keys() != gaussian.keys() or any(not torch.equal(own[b], gaussian[b]) for b in own):
                    raise RuntimeError(f"{name}: Gaussian conditional tables differ from the first one")
            else:
                tables.update({f"{name}.{b}": t for b, t in own.items()})
        return tables

    def load_entropy_tables(self, tables: dict[str, Tensor]) -> None:
        """Restore buffers saved by `entropy_tables()` (sizes may differ from the fresh ones)."""
        modules = dict(self.named_modules())
        for key, value in tables.items():
            name, buf = key.rsplit(".", 1)
            if name == _SHARED_GAUSSIAN:
                targets = [m for m in modules.values() if isinstance(m, GaussianConditional)]
            else:
                targets = [modules[name]]
            for module in targets:
                module._buffers[buf] = value.to(module._buffers[buf].device)

    def is_updated(self) -> bool:
        """True when every entropy model has CDF tables (compress/decompress can run)."""
        return all(m._quantized_cdf.numel() > 0 for m in self.modules() if isinstance(m, EntropyModel))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Plain nn.Module loading: the CDF tables are not in the state dict, so compressai's
        table-resizing override does not apply."""
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def after_load(self) -> None:
        """Called by `from_pretrained` after the weights and tables are in place."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        if self.is_updated():
            save_file(self.entropy_tables(), str(Path(save_directory) / ENTROPY_TABLES_FILE))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        # compressai's EntropyBottleneck cannot be built on the meta device.
        kwargs["low_cpu_mem_usage"] = False
        kwargs.pop("device_map", None)
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model.after_load()
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        tables = folder / ENTROPY_TABLES_FILE
        if tables.is_file():
            model.load_entropy_tables(load_file(str(tables)))
        else:
            model.update(force=True)
        return model
