"""Feed-forward block of a transformer decoder layer (no residual, no normalisation)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FFN", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "glu": lambda x: F.glu(x, dim=-1),
}


class FFN(nn.Module):
    """``linear2(dropout(activation(linear1(x))))``, Deformable-DETR's FFN without the residual.

    Args:
        embed_dim: channels ``C``.
        ffn_dim: hidden channels ``F`` (``linear1`` outputs ``F``; with ``"glu"`` ``linear2``
            takes ``F / 2``).
        dropout: dropout after the activation.
        activation: ``"relu"``, ``"gelu"`` or ``"glu"``.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if activation == "glu" and ffn_dim % 2 != 0:
            raise ValueError(f"ffn_dim must be even with activation='glu', got {ffn_dim}")
        self.activation = activation
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim // 2 if activation == "glu" else ffn_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        """Default ``nn.Linear`` initialisation of both linears."""
        self.linear1.reset_parameters()
        self.linear2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """``x (Tensor[..., C])`` -> ``Tensor[..., C]``."""
        return self.linear2(self.dropout(ACTIVATIONS[self.activation](self.linear1(x))))
