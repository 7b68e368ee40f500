"""Tiny models shared by the tests: 2D/3D classifiers and segmenters (float64 where exactness is asserted)."""
import pytest
import torch
from torch import nn


def conv(nd):
    return nn.Conv2d if nd == 2 else nn.Conv3d


class TinyClassifier(nn.Module):
    """conv-relu-conv-relu-pool-linear; `features.2` is the CAM layer."""

    def __init__(self, nd=2, cin=2, k=3):
        super().__init__()
        C = conv(nd)
        self.features = nn.Sequential(C(cin, 4, 3, padding=1), nn.ReLU(), C(4, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(6, k)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class TinySegmenter(nn.Module):
    """conv-relu-conv producing K logit channels on the input grid."""

    def __init__(self, nd=2, cin=2, k=2):
        super().__init__()
        C = conv(nd)
        self.body = nn.Sequential(C(cin, 5, 3, padding=1), nn.ReLU(), C(5, 5, 3, padding=1), nn.ReLU())
        self.head = C(5, k, 1)

    def forward(self, x):
        return self.head(self.body(x))


def make(kind, nd, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = (TinyClassifier if kind == "cls" else TinySegmenter)(nd)
    return m.to(dtype).eval()


def image(nd, b=3, seed=1, dtype=torch.float64, size=None):
    g = torch.Generator().manual_seed(seed)
    s = size or (12 if nd == 2 else 8)
    return torch.randn((b, 2) + (s,) * nd, generator=g, dtype=dtype)


@pytest.fixture
def tiny():
    return make, image
