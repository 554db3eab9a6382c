"""Small building blocks every model shares: RMSNorm, the FFN, the prediction head, and the
log2 time bucketing. Pure tensor functions of their inputs; nothing here knows a config file,
a batch or a table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the autocast dtype (bf16-safe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class FFN(nn.Module):
    """The position-wise feed-forward: d → mult·d → d with GELU."""

    def __init__(self, d: int, mult: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, mult * d), nn.Linear(mult * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Head(nn.Module):
    """logit = MLP([user vector, target token, context token]), each normalised first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norms = nn.ModuleList([RMSNorm(d) for _ in range(3)])
        self.mlp = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, user: torch.Tensor, target: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """user (B, d) or (B, N, d); target, context (B, N, d) → logits (B, N) in fp32."""
        user = user[:, None].expand_as(target) if user.dim() < target.dim() else user
        x = torch.cat([n(t) for n, t in zip(self.norms, (user, target, context))], -1)
        return self.mlp(x).squeeze(-1).float()


def log2_bucket(seconds: torch.Tensor, n: int) -> torch.Tensor:
    """floor(log2(s + 1)) clipped to [0, n - 1]; negative gaps count as 0."""
    s = seconds.clamp(min=0).to(torch.float64)
    return torch.floor(torch.log2(s + 1.0)).long().clamp(max=n - 1)
