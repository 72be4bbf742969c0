"""Small pieces shared by the project's own model classes."""

from __future__ import annotations

import torch


class DeviceDtypeMixin:
    """``device`` / ``dtype`` properties of a plain ``nn.Module`` (from its first parameter), as diffusers'
    pipeline utilities (``pipe.device``, ``.to()``, offloading) expect of every component."""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32
