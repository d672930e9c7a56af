"""The streaming speech model: PCM16 in, per-frame posteriors out, front end included.

``LogMelFrontEnd`` computes the features of ``rnnserve.audio`` (same definition,
same constants) with operations that export to ONNX and stream: frames cut by a
reshape and strided slices, the windowed DFT one matrix product with the windowed
cosine and sine rows, the mel bands another. Streaming needs the last
``win - hop`` samples of the previous chunk; they are carried as state, so the
exported model takes any chunk whose length is a multiple of the hop.

``SpeechModel`` = front end -> per-band normalisation (statistics of the training
set, stored in the model) -> ``RecurrentModel`` on features -> softmax. Training
uses the same front end module to compute its features, so what the server runs
is what the model was trained on.

State, batch-major like the text models: ``frame`` (B, win - hop) samples as float
in [-1, 1), then ``h`` [, ``c``] (B, layers, hidden).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnserve.audio import FrontEnd, dft_matrices, mel_filterbank
from rnnserve.errors import CheckpointError
from rnnserve.training.model import ModelConfig, RecurrentModel, State


class LogMelFrontEnd(nn.Module):
    kernels: torch.Tensor
    mel: torch.Tensor

    def __init__(self, fe: FrontEnd) -> None:
        super().__init__()
        fe.check()
        self.fe = fe
        cos, sin = dft_matrices(fe)  # (bins, win) each
        kernels = torch.tensor(np.concatenate([cos, sin]).T, dtype=torch.float32)
        self.register_buffer("kernels", kernels)  # (win, 2 * bins)
        self.block = math.gcd(fe.win_samples, fe.hop_samples)
        self.register_buffer("mel", torch.tensor(mel_filterbank(fe), dtype=torch.float32))

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(batch, self.fe.overlap, device=device, dtype=self.kernels.dtype)

    def forward(self, pcm: torch.Tensor, overlap: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """pcm (B, N) int16 values, N a multiple of the hop -> log-mel (B, N / hop, mels)."""
        fe = self.fe
        x = pcm.to(self.kernels.dtype) / 32768.0
        full = torch.cat([overlap, x], dim=1)  # (B, overlap + N)
        # Frames by reshaping, not by a strided convolution: cut the signal into blocks
        # of gcd(win, hop) samples; frame t is blocks t*r .. t*r + w - 1 (r = hop / block,
        # w = win / block), gathered by strided slices. The DFT is then one MatMul
        # whose result for a frame does not depend on how many frames the chunk has,
        # so chunked and whole-utterance runs agree exactly.
        blocks = full.reshape(full.shape[0], -1, self.block)  # (B, overlap/block + N/block, b)
        r, w = fe.hop_samples // self.block, fe.win_samples // self.block
        n_blocks = blocks.shape[1]
        parts = [blocks[:, j:n_blocks - (w - 1 - j):r] if j < w - 1 else blocks[:, j::r]
                 for j in range(w)]
        frames = torch.cat(parts, dim=-1)  # (B, T, win)
        spec = torch.matmul(frames, self.kernels)  # (B, T, 2 * bins)
        bins = fe.n_bins
        re, im = spec[..., :bins], spec[..., bins:]
        power = re * re + im * im  # (B, T, bins)
        feats = torch.log(torch.matmul(power, self.mel) + fe.log_floor)
        # full[:, -0:] would be all of it: no overlap, an empty state
        return feats, full[:, -fe.overlap:] if fe.overlap else full[:, :0]


class SpeechModel(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ModelConfig, fe: FrontEnd, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.input_kind != "features" or config.input_size != fe.n_mels:
            raise CheckpointError(f"a speech model's recurrent part takes {fe.n_mels} features, "
                                  f"its config says {config.input_kind} x {config.input_size}")
        self.config = config
        self.frontend = LogMelFrontEnd(fe)
        self.register_buffer("mean", mean if mean is not None else torch.zeros(fe.n_mels))
        self.register_buffer("std", std if std is not None else torch.ones(fe.n_mels))
        self.rnn = RecurrentModel(config)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("frame", *self.config.state_names)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        return (self.frontend.initial_state(batch, device), *self.rnn.initial_state(batch, device))

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    def forward(self, pcm: torch.Tensor, state: State | None = None
                ) -> tuple[torch.Tensor, State]:
        """pcm (B, N) -> posteriors (B, N / hop, labels), new state."""
        if state is None:
            state = self.initial_state(pcm.shape[0], pcm.device)
        feats, overlap = self.frontend(pcm, state[0])
        logits, rnn_state = self.rnn(self.normalize(feats), tuple(state[1:]))
        return torch.softmax(logits, dim=-1), (overlap, *rnn_state)


def speech_model_from_checkpoint(ckpt: dict[str, Any]) -> SpeechModel:
    """Rebuild a speech checkpoint's model (front end, statistics, weights), in eval mode."""
    try:
        fe = FrontEnd(**ckpt["frontend"])
        config = ModelConfig.from_dict(ckpt["model_config"])
        model = SpeechModel(config, fe,
                            torch.as_tensor(ckpt["feature_mean"], dtype=torch.float32),
                            torch.as_tensor(ckpt["feature_std"], dtype=torch.float32))
        model.rnn.load_state_dict(ckpt["model_state"])
    except KeyError as exc:
        raise CheckpointError(f"speech checkpoint lacks {exc}") from exc
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"speech checkpoint does not fit its own config: {exc}") from exc
    return model.eval()
