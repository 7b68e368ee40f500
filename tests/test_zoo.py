"""Model zoo, the training routine, and the weight cache."""
import os

import pytest
import torch

from medexplain import data, training
from medexplain.errors import InputError
from medexplain.models import zoo
from medexplain.training import auroc, dice_score, evaluate, train


def test_networks_shapes_and_cam_layer():
    net = zoo.classifier_2d(3, 4).eval()
    for s in (32, 64):
        assert net(torch.zeros(2, 3, s, s)).shape == (2, 4)
    layer = dict(net.named_modules())[zoo.cam_layer(net)]
    seen = []
    h = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    net(torch.zeros(1, 3, 64, 64))
    h.remove()
    assert seen == [torch.Size([1, 64, 8, 8])]                   # 8x8 feature map for CAMs at 64 px
    unet = zoo.unet_3d(2, 3).eval()
    assert unet(torch.zeros(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_auroc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40,), generator=g).double()       # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = s[y == 1], s[y == 0]
    ref = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert auroc(s, y) == pytest.approx(float(ref), abs=1e-12)
    assert auroc(torch.stack([-s, s], 1), y) == pytest.approx(float(ref), abs=1e-12)   # one-vs-rest mean
    assert auroc(s, torch.zeros(40, dtype=torch.long)) != auroc(s, torch.zeros(40, dtype=torch.long))  # NaN


def test_dice_score():
    p = torch.tensor([[0, 1, 1, 0]])
    t = torch.tensor([[0, 1, 0, 0]])
    assert dice_score(p, t, 2).item() == pytest.approx(2 / 3)
    assert dice_score(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 2).item() == 1.0


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (torch.arange(n) % 2)
    x[y == 1, :, 2:5, 2:5] += 2.0
    return x, y


def test_train_learns_writes_checkpoint_atomically_and_is_seeded(tmp_path):
    x, y = _toy()
    def make():
        torch.manual_seed(0)
        return zoo.classifier_2d(1, 2, widths=(4, 4, 8, 8))
    ck = tmp_path / "sub" / "w.pt"
    m1 = make()
    h = train(m1, (x, y), (x, y), epochs=4, batch_size=16, lr=1e-2, seed=1, checkpoint=ck, progress=False)
    assert set(h) >= {"loss", "val_accuracy", "val_auroc", "seconds"} and len(h["loss"]) == 4
    assert h["val_accuracy"][-1] >= 0.9 and h["loss"][-1] < h["loss"][0]
    assert not m1.training
    assert sorted(os.listdir(ck.parent)) == ["w.pt"]                      # no temporary file left
    state = torch.load(ck, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in m1.state_dict().items())
    m2 = make()
    h2 = train(m2, (x, y), None, epochs=4, batch_size=16, lr=1e-2, seed=1, progress=False)
    assert h2["loss"] == h["loss"]                                        # same seed, same run
    assert evaluate(m2, (x, y))["accuracy"] == h["val_accuracy"][-1]


def test_train_segmentation_and_bce_and_errors():
    ds = data.lesion_volumes(n=2, size=12, seed=0)
    torch.manual_seed(0)
    net = zoo.unet_3d(2, 2, channels=(4, 8), strides=(2,))
    h = train(net, ds, ds, epochs=1, batch_size=2, lr=1e-2, progress=False)
    assert h["loss_name"] == "dice_ce" and 0.0 <= h["val_dice"][0] <= 1.0
    x, y = _toy(16)
    h = train(zoo.classifier_2d(1, 2, widths=(4, 4, 4, 4)), (x, y), (x, y), epochs=1, loss="bce", progress=False)
    assert h["loss_name"] == "bce"
    with pytest.raises(InputError):
        train(zoo.classifier_2d(1, 2), (x, y), loss="hinge", progress=False)
    with pytest.raises(InputError):
        train(zoo.classifier_2d(1, 2), object(), progress=False)


def test_pretrained_small_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEXPLAIN_CACHE", str(tmp_path))
    m1, ds1 = zoo.pretrained("chest_xray", seed=0, size="small", progress=False)
    assert not m1.training and m1.zoo_info["cached"] is False
    path = m1.zoo_info["path"]
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
    assert "val_accuracy" in m1.zoo_info["history"]
    assert ds1.images.shape[1:] == (1, 32, 32) and ds1.meta_info["train_frac"] == 0.8

    def no_training(*a, **k):
        raise AssertionError("pretrained retrained although weights were cached")
    monkeypatch.setattr(training, "train", no_training)
    m2, ds2 = zoo.pretrained("chest_xray", seed=0, size="small", progress=False)
    assert m2.zoo_info["cached"] is True and m2.zoo_info["path"] == path
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(ds1.images, ds2.images)
    x = ds2.images[:4]
    assert torch.equal(m1(x), m2(x))
    # a different configuration is a different cache entry
    assert zoo.config_hash(zoo.config("chest_xray", 1, "small")) != zoo.config_hash(zoo.config("chest_xray", 0, "small"))
    with pytest.raises(InputError):
        zoo.pretrained("mnist")
    with pytest.raises(InputError):
        zoo.pretrained("chest_xray", size="huge")


def test_channel_dropout_drops_only_the_listed_channels_and_never_all():
    from medexplain.models.zoo import _channel_dropout
    x, y = torch.ones(400, 2, 3, 3), torch.zeros(400, 3, 3)
    gen = torch.Generator().manual_seed(0)
    out, y2 = _channel_dropout(0.5, channels=(0,))(x, y, gen)
    kept = out.flatten(2).amax(2) > 0                       # (N, C): channel survived
    assert kept[:, 1].all() and 0.35 < 1 - kept[:, 0].float().mean() < 0.65 and y2 is y
    out = _channel_dropout(0.9)(x, y, gen)[0]               # all channels may drop, but never all at once
    kept = out.flatten(2).amax(2) > 0
    assert kept.any(1).all() and (~kept[:, 0]).any() and (~kept[:, 1]).any()
