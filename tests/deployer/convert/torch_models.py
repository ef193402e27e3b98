"""PyTorch modules for the conversion tests (imported only where torch is installed).

Kept at module level with real ``torch.Tensor`` annotations, which TorchScript needs.
"""

import torch


class TwoHeads(torch.nn.Module):
    """Two inputs, two outputs: class scores and the winning class per row."""

    def __init__(self, features: int, extra: int, classes: int) -> None:
        super().__init__()
        self.body = torch.nn.Linear(features, 16)
        self.side = torch.nn.Linear(extra, 16)
        self.head = torch.nn.Linear(16, classes)

    def forward(
        self, features: torch.Tensor, extra: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.body(features) + self.side(extra))
        scores = self.head(hidden)
        return scores, scores.argmax(dim=1)


class Noisy(torch.nn.Module):
    """Adds fresh noise on every call: converts, but cannot pass a check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class Spectrum(torch.nn.Module):
    """Uses an FFT, which the TorchScript ONNX exporter does not translate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()
