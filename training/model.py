"""Unidirectional LSTM/GRU models whose recurrent state is an explicit argument.

``forward(x, state) -> (y, new_state)``: calling the model chunk by chunk with the
state carried forward gives the same outputs as one call on the whole sequence.
The state is batch-major: each tensor is ``(B, num_layers, hidden_size)``, so one
session's state is one contiguous row (see DESIGN.md, "the exported model").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from rnnserve.errors import CheckpointError, UsageError

ARCHS = ("lstm", "gru")
INPUT_KINDS = ("bytes", "features")

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    """Model dimensions; saved inside every checkpoint and rebuilt from it."""

    arch: str  # "lstm" | "gru"
    input_kind: str  # "bytes": byte values 0..255; "features": float frames
    input_size: int  # 256 for bytes; the feature dimension for features
    output_size: int  # logits per time step
    hidden_size: int = 256
    num_layers: int = 2
    embed_size: int = 64  # width of the input stage (embedding or linear)
    dropout: float = 0.0  # between recurrent layers and before the head (training only)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"unknown arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.input_kind not in INPUT_KINDS:
            raise UsageError(
                f"unknown input kind {self.input_kind!r}; choose from {', '.join(INPUT_KINDS)}"
            )
        if self.input_kind == "bytes" and self.input_size != 256:
            raise UsageError(f"byte input has 256 values, got input_size={self.input_size}")
        for name in ("input_size", "output_size", "hidden_size", "num_layers", "embed_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.arch == "lstm" else ("h",)

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.num_layers, self.hidden_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"model config has unknown fields {unknown}; newer rnnserve?")
        return cls(**d)


class RecurrentModel(nn.Module):
    """Input stage -> stacked LSTM/GRU -> linear head, with explicit state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.input_kind == "bytes":
            self.input_stage: nn.Module = nn.Embedding(256, config.embed_size)
        else:
            self.input_stage = nn.Linear(config.input_size, config.embed_size)
        rnn_cls = nn.LSTM if config.arch == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            input_size=config.embed_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.output_size)

    def initial_state(self, batch: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> State:
        shape = self.config.state_shape(batch)
        return tuple(torch.zeros(shape, device=device, dtype=dtype)
                     for _ in self.config.state_names)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T) byte values (any integer dtype) or (B, T, F) float frames.

        Returns logits (B, T, output_size) and the new state, each (B, L, H).
        """
        if self.config.input_kind == "bytes":
            e = self.input_stage(x.long())  # (B, T, E)
        else:
            e = self.input_stage(x)  # (B, T, E)
        if state is None:
            state = self.initial_state(x.shape[0], x.device, e.dtype)
        # torch keeps layer-major state (L, B, H); ours is batch-major (B, L, H).
        s = tuple(t.transpose(0, 1).contiguous() for t in state)  # (L, B, H) each
        if self.config.arch == "lstm":
            out, (h, c) = self.rnn(e, (s[0], s[1]))  # out: (B, T, H)
            new: State = (h.transpose(0, 1), c.transpose(0, 1))  # (B, L, H) each
        else:
            out, h = self.rnn(e, s[0])  # out: (B, T, H)
            new = (h.transpose(0, 1),)  # (B, L, H)
        y = self.head(self.drop(out))  # (B, T, O)
        return y, new


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
