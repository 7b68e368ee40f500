"""Model zoo, the training routine, and the weight cache."""
import math
import os

import pytest
import torch

from medexplain import data
from medexplain.errors import InputError
from medexplain.models import zoo
from medexplain.models.training import WEIGHTS_FORMAT, auroc, dice_score, evaluate, read_weights, train


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
    assert math.isnan(auroc(s, torch.zeros(40, dtype=torch.long)))           # one class only: undefined


def test_dice_score():
    p = torch.tensor([[0, 1, 1, 0]])
    t = torch.tensor([[0, 1, 0, 0]])
    assert dice_score(p, t, 2).item() == pytest.approx(2 / 3)
    assert dice_score(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 2).item() == 1.0
    # 3 classes: class 1 Dice 2/3, class 2 absent from both (1.0), per case
    p3, t3 = torch.tensor([[0, 1, 1, 0], [2, 2, 0, 0]]), torch.tensor([[0, 1, 0, 0], [2, 0, 0, 0]])
    assert dice_score(p3, t3, 3).tolist() == pytest.approx([(2 / 3 + 1) / 2, (1 + 2 / 3) / 2])


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
    blob = torch.load(ck, weights_only=True)                              # the one weight format
    assert blob["format"] == WEIGHTS_FORMAT and blob["epoch"] == 4 and blob["history"]["loss"] == h["loss"]
    state = read_weights(ck)["state_dict"]
    assert state.keys() == m1.state_dict().keys()
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
    pred = net(ds.images).argmax(1)
    assert h["loss_name"] == "dice_ce"
    assert h["val_dice"][0] == pytest.approx(float(dice_score(pred, ds.seg, 2).mean()), abs=1e-6)
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
    monkeypatch.setattr(zoo, "train", no_training)                       # the name pretrained calls
    m2, ds2 = zoo.pretrained("chest_xray", seed=0, size="small", progress=False)
    assert m2.zoo_info["cached"] is True and m2.zoo_info["path"] == path
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(ds1.images, ds2.images)
    x = ds2.images[:4]
    assert torch.equal(m1(x), m2(x))
    # a different configuration is a different cache entry
    assert zoo.config_hash(zoo.config("chest_xray", 1, "small")) != zoo.config_hash(zoo.config("chest_xray", 0, "small"))
    # a cache file in another format (the zoo's before WEIGHTS_FORMAT) is retrained, not guessed at
    monkeypatch.undo()
    monkeypatch.setenv("MEDEXPLAIN_CACHE", str(tmp_path))
    torch.save({"state_dict": m1.state_dict(), "history": {}}, path)
    m3, _ = zoo.pretrained("chest_xray", seed=0, size="small", progress=False)
    assert m3.zoo_info["cached"] is False and read_weights(path)["config"] == zoo.config("chest_xray", 0, "small")
    with pytest.raises(InputError):
        zoo.pretrained("mnist")
    with pytest.raises(InputError):
        zoo.pretrained("chest_xray", size="huge")


def test_channel_dropout_drops_only_the_listed_channels_and_never_all():
    from medexplain.data.augment import channel_dropout
    x, y = torch.ones(400, 2, 3, 3), torch.zeros(400, 3, 3)
    gen = torch.Generator().manual_seed(0)
    out, y2 = channel_dropout(0.5, channels=(0,))(x, y, gen)
    kept = out.flatten(2).amax(2) > 0                       # (N, C): channel survived
    assert kept[:, 1].all() and 0.35 < 1 - kept[:, 0].float().mean() < 0.65 and y2 is y
    out = channel_dropout(0.9)(x, y, gen)[0]                # all channels may drop, but never all at once
    kept = out.flatten(2).amax(2) > 0
    assert kept.any(1).all() and (~kept[:, 0]).any() and (~kept[:, 1]).any()


def test_random_flip_moves_image_and_label_map_together():
    from medexplain.data.augment import compose, random_flip
    g = torch.Generator().manual_seed(0)
    x = torch.arange(64 * 16, dtype=torch.float32).view(64, 1, 4, 4)
    y = x[:, 0].long()                                      # the label map equals the image
    xo, yo = compose(random_flip)(x, y, g)
    assert torch.equal(xo[:, 0].long(), yo) and not torch.equal(xo, x)
    flipped = [(xo[i, 0] != x[i, 0]).any().item() for i in range(64)]
    assert 0.5 < sum(flipped) / 64 < 0.95                   # P(some flip of 2 axes) = 3/4
    assert torch.equal(xo.sort(-1).values.sort(-2).values, x.sort(-1).values.sort(-2).values)  # a permutation


def test_read_weights_tells_formats_apart(tmp_path):
    from medexplain.errors import ModelLoadError
    from medexplain.models.training import save_weights
    net = zoo.classifier_2d(1, 2, widths=(4, 4, 4, 4))
    save_weights(net, tmp_path / "a.pt", note="x")
    a = read_weights(tmp_path / "a.pt")
    assert a["note"] == "x" and set(a) == {"state_dict", "note"}
    torch.save(net.state_dict(), tmp_path / "plain.pt")                   # torch.save(model.state_dict())
    assert read_weights(tmp_path / "plain.pt")["state_dict"].keys() == net.state_dict().keys()
    torch.save({"weights": net.state_dict(), "epoch": 3}, tmp_path / "other.pt")   # no known checkpoint key
    with pytest.raises(ModelLoadError, match="neither a state dict") as e:
        read_weights(tmp_path / "other.pt")
    assert "'model_state_dict'" in str(e.value) and "['epoch', 'weights']" in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="cannot load"):
        read_weights(tmp_path / "junk.pt")
    with pytest.raises(InputError):
        save_weights(net, tmp_path / "b.pt", state_dict=1)
