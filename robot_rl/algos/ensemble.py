"""A Q-function ensemble evaluated in one batched call: every layer holds all heads' weights as one tensor.

Why: RLPD/ResFiT use ~10 critic heads; a Python loop over 10 MLPs launches 10x the kernels, which dominates for
small heads and on a GPU. Stacked weights turn each layer into one batched matmul over heads, with the same maths
per head as an `nn.Linear` + `nn.LayerNorm` MLP. The TD target evaluates only the 2 heads it uses (`heads=`).
Measured on this project's 2-core CPU (benchmarks/bench_learner_throughput.py, batch 256, 1 thread): at
[256, 256] batched (2-head target) is at parity with a per-head loop (47.5 vs 46.9 updates/s), at [1024, 1024]
slower (4.2 vs 4.9): the stacked tensors leave the cache. The GPU case is where batching is expected to pay
(benchmarks/gpu_check.sh measures it; not yet run on a GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EnsembleLinear(nn.Module):
    """E independent linear layers: (B, in) or (E, B, in) -> (E, B, out). Initialised per head like nn.Linear."""

    def __init__(self, num_heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_heads, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default (kaiming_uniform with a=sqrt(5)) bound
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if heads is None else (self.weight[heads], self.bias[heads])
        if x.dim() == 2:  # same input for every head
            x = x.unsqueeze(0).expand(weight.shape[0], -1, -1)
        return torch.baddbmm(bias, x, weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over features with a separate affine per head ((E, B, H) -> (E, B, H))."""

    def __init__(self, num_heads: int, features: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, 1, features))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, features))
        self.eps = eps

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if heads is None else (self.weight[heads], self.bias[heads])
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight + bias


class EnsembleQ(nn.Module):
    """Q(s, a) for E heads at once: features (B, F) and actions (B, A) -> (E, B).

    Each head: [Linear -> LayerNorm -> ReLU] x len(hidden) -> Linear(1). LayerNorm in the critic is what keeps
    Q-values bounded when training mostly off-policy (RLPD; ResFiT's ablation calls it crucial).
    """

    def __init__(self, num_heads: int, in_dim: int, hidden: list[int], layer_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        last = in_dim
        for width in hidden:
            layers.append(EnsembleLinear(num_heads, last, width))
            if layer_norm:
                layers.append(EnsembleLayerNorm(num_heads, width))
            layers.append(nn.ReLU())
            last = width
        layers.append(EnsembleLinear(num_heads, last, 1))
        self.net = nn.Sequential(*layers)
        self.num_heads = num_heads

    def forward(self, features: torch.Tensor, action: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """(E, B) Q-values, or (len(heads), B) for a subset of heads."""
        x = torch.cat([features, action], dim=-1)
        for layer in self.net:
            x = layer(x, heads) if isinstance(layer, (EnsembleLinear, EnsembleLayerNorm)) else layer(x)
        return x.squeeze(-1)

    def head(self, i: int) -> nn.Sequential:
        """Head i as a plain nn.Sequential of nn.Linear/nn.LayerNorm (a copy; for checks and the loop baseline)."""
        out: list[nn.Module] = []
        for layer in self.net:
            if isinstance(layer, EnsembleLinear):
                lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
                lin.weight.data.copy_(layer.weight[i].T)
                lin.bias.data.copy_(layer.bias[i, 0])
                out.append(lin)
            elif isinstance(layer, EnsembleLayerNorm):
                ln = nn.LayerNorm(layer.weight.shape[-1], eps=layer.eps)
                ln.weight.data.copy_(layer.weight[i, 0])
                ln.bias.data.copy_(layer.bias[i, 0])
                out.append(ln)
            else:
                out.append(nn.ReLU())
        return nn.Sequential(*out)


@torch.no_grad()
def polyak(net: nn.Module, target: nn.Module, tau: float) -> None:
    """Target <- (1 - tau) * target + tau * net, all parameters in one multi-tensor op (one kernel launch per group
    on a GPU instead of one per tensor)."""
    torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), tau)


def _fused_ok(params) -> bool:
    """Fused (single-kernel) Adam exists for float params on CPU and CUDA in recent torch; fewer passes over the
    stacked ensemble weights."""
    return all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda") for p in params
    )


def make_adamw(params, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=_fused_ok(params) or None)
    except (RuntimeError, TypeError):  # a torch without fused CPU Adam
        return torch.optim.AdamW(params, lr=lr)


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=_fused_ok(params) or None)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)
