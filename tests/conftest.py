"""Tiny models shared by the tests: 2D/3D classifiers and segmenters (float64 where exactness is asserted)."""
import sys
import types

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


@pytest.fixture
def one_thread():
    """One torch thread: on 2 shared cores, OpenMP's threads make each tiny convolution ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def import_pytorch_grad_cam():
    """pytorch-grad-cam's CAM classes are pure torch; only its image utilities import torchvision, which is
    not installed (it would replace the CPU torch): register a stub first, then import it (skip if absent)."""
    for name, attrs in [("torchvision", {}), ("torchvision.transforms", dict(Compose=object, Normalize=object, ToTensor=object)),
                        ("torchvision.transforms.functional", dict(resize=object))]:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = []
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
    return pytest.importorskip("pytorch_grad_cam")


def no_hooks(model) -> bool:
    """No forward, forward-pre, backward or backward-pre hook left on any module."""
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in model.modules())


def snapshot(model):
    """What "the model is left exactly as found" compares: weights and buffers, each module's train/eval mode,
    requires_grad and attribute names (a rule or cache left on a layer), and the parameters' storage."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training, [p.requires_grad for p in m.parameters(recurse=False)], sorted(m.__dict__))
             for n, m in model.named_modules()],
            [p.data_ptr() for p in model.parameters()])


def assert_untouched(model, snap):
    before, flags, ptrs = snap
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == snapshot(model)[1]
    assert ptrs == [p.data_ptr() for p in model.parameters()]
    assert no_hooks(model)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def region_targets(x):
    """A segmenter ``Region`` target over a batch of 3 and the per-sample targets it splits into."""
    from medexplain.engine.targets import Region
    nd = x.ndim - 2
    mask = torch.zeros((3,) + x.shape[2:], dtype=torch.bool)
    mask[(slice(None),) + (slice(2, 5),) * nd] = True
    mask[(1,) + (slice(5, 7),) * nd] = True
    return Region(1, mask), lambda i: Region(1, mask[i:i + 1])


def check_batch_matrix(method, nd, kind, opts):
    """The baseline matrix: ``method`` on a tiny 2D/3D classifier (classes 0, 2, 1) or segmenter (a Region)
    in train mode with a frozen head: a batch of 3 equals three batches of 1 (to 1e-6 relative), the map is
    on the input grid, forwards are counted, and the model comes back exactly as found. Returns the batch
    result for method-specific checks."""
    import medexplain as mx
    model, x = make(kind, nd), image(nd)
    model.train()  # a non-default mode that must come back as found
    model.head.requires_grad_(False) if kind == "seg" else model.fc.requires_grad_(False)
    snap = snapshot(model)
    target, single = ([0, 2, 1], lambda i: [0, 2, 1][i]) if kind == "cls" else region_targets(x)
    full = mx.explain(model, x, method, target=target, **opts)
    parts = torch.cat([mx.explain(model, x[i:i + 1], method, target=single(i), **opts).map for i in range(3)])
    assert full.map.shape[0] == 3 and full.map.shape[2:] == x.shape[2:] and full.map.shape[1] in (1, x.shape[1])
    assert (full.map - parts).abs().max() <= 1e-6 * max(1.0, parts.abs().max().item())
    assert full.info["n_forward"] >= 3 and full.info["seconds"] > 0
    assert_untouched(model, snap)
    return full


# ---- a real PACS (Orthanc with DICOMweb) for tests/test_pacs.py: tests/pacs_fixture.py ------------------------
from pacs_fixture import orthanc  # noqa: E402,F401
