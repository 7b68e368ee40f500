"""Issue 23, "one model object": every analysis takes the model object (a bare module is wrapped), so the
Model's settings hold everywhere: the train/eval policy in ``instances`` and ``shapley`` as in ``explain``,
the modes a TorchScript file or a factory gives, and ``--device`` for ``demo`` and ``train``."""
import inspect

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain import metrics as M
from medexplain.errors import InputError
from medexplain.io import read_channels
from medexplain.models.loading import load_model as load_spec
from medexplain.models.training import evaluate
from medexplain.pipelines import contrast_shapley, explain_lesion_instances
from medexplain.segmentation import context_experiment, explain_instances
from medexplain.segmentation.shapley import channel_shapley, mean_foreground_probability


def _net(dims: int = 3, seed: int = 0) -> nn.Sequential:
    """A tiny segmenter whose InstanceNorm (track_running_stats) gives another output in train mode
    (the input's own statistics) than in eval mode (its stored running statistics)."""
    torch.manual_seed(seed)
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return nn.Sequential(conv(2, 4, 1), norm(4, track_running_stats=True), nn.Tanh(), conv(4, 2, 1))


def mixed_factory():
    """A factory whose author keeps the normalisation layer in training mode (per-image statistics)."""
    net = _net(2).eval()
    net[1].train()
    return net


def training_factory():
    return _net(2)   # as nn.Module builds it: entirely in training mode


def _state(net):
    return [m.training for m in net.modules()], {k: v.clone() for k, v in net.state_dict().items()}


def _same_state(net, state):
    modes, sd = state
    return [m.training for m in net.modules()] == modes and all(torch.equal(v, sd[k]) for k, v in
                                                                   net.state_dict().items())


def _case(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 6, 6, 2, generator=g)
    nib.save(nib.Nifti1Image(img.numpy(), np.eye(4)), str(tmp_path / "v.nii.gz"))
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:3, 1:4, 2:4] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    x = read_channels([tmp_path / "v.nii.gz"])[0][None]
    return x


def test_instances_use_the_model_as_given_in_mixed_modes_and_keep_eval_never(tmp_path):
    x = _case(tmp_path)
    mixed = _net().eval()
    mixed[1].train()                                    # the author's choice: instance statistics
    nevers = _net(seed=1)                               # entirely in training mode, run as given (eval="never")
    for name, net, eval_ in (("mixed", mixed, "auto"), ("never", nevers, "never")):
        state = _state(net)
        with torch.no_grad():
            own = torch.softmax(net(x), 1)[0, 1]        # its own prediction as given
            net.eval()
            switched = torch.softmax(net(x), 1)[0, 1]
        net.load_state_dict(state[1])
        for m, t in zip(net.modules(), state[0]):
            m.train(t)
        assert (own - switched).abs().max() > 1e-2, name   # the policy matters for this network
        res = explain_lesion_instances(tmp_path / "v.nii.gz", mx.ModelSpec(net, eval=eval_), tmp_path / name,
                                       region=tmp_path / "mask.nii.gz", channel=1, n_samples=2, seed=3)
        prob = torch.from_numpy(nib.load(str(tmp_path / name / "probability.nii.gz")).get_fdata()).float()
        assert torch.allclose(prob, own, atol=1e-5), name
        saliency = torch.from_numpy(nib.load(str(res.files[2])).get_fdata()).float()   # instance_001_*.nii.gz
        assert res.files[2].name.startswith("instance_001")
        model = mx.Model(net, eval=eval_)
        direct = explain_instances(model, x, res.instances, n_samples=2, seed=3, channel=1).map[0]
        in_eval = explain_instances(mx.Model(net, eval="always"), x, res.instances, n_samples=2, seed=3,
                                    channel=1).map[0]
        assert (direct - in_eval).abs().max() > 1e-4, name
        assert torch.allclose(saliency, direct.movedim(0, -1), atol=1e-5), name
        assert _same_state(net, state), name             # modes and running statistics as found


def test_shapley_keeps_the_models_eval_policy(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 4, 4, 4, generator=g)
    np.save(tmp_path / "c.npy", img.numpy())
    net = _net()                                        # entirely in training mode
    state = _state(net)
    res = contrast_shapley(tmp_path / "c.npy", [mx.Model(net, eval="never")], tmp_path / "out")
    value = mean_foreground_probability(1, "softmax")
    never = channel_shapley(mx.Model(net, eval="never"), img[None], value)
    auto = channel_shapley(net, img[None], value)       # auto: switched to eval
    torch.testing.assert_close(res.results[0].values, never.values)
    assert not torch.allclose(never.values, auto.values, atol=1e-4)
    res_auto = contrast_shapley(tmp_path / "c.npy", [net], tmp_path / "out_auto")
    torch.testing.assert_close(res_auto.results[0].values, auto.values)
    assert _same_state(net, state)


def test_loaders_keep_the_modes_a_factory_or_torchscript_file_gives(tmp_path):
    mixed = load_spec("test_model_everywhere:mixed_factory")
    assert [m.training for m in mixed] == [False, True, False, False]
    x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    fresh = load_spec("test_model_everywhere:training_factory")
    assert all(m.training for m in fresh.modules())      # as the factory built it
    with torch.no_grad():   # (a forward in training mode updates the running statistics: fresh copies)
        as_given = training_factory()(x)
        in_eval = training_factory().eval()(x)
    assert (as_given - in_eval).abs().max() > 1e-3
    never = mx.load_model("test_model_everywhere:training_factory", eval="never")
    auto = mx.load_model("test_model_everywhere:training_factory")
    assert torch.allclose(never.predict(x), as_given, atol=1e-6)   # --eval never keeps the training mode
    assert torch.allclose(auto.predict(x), in_eval, atol=1e-6)     # auto: an all-training model runs in eval
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(training_factory()), str(path))
    scripted = load_spec(str(path))
    assert scripted.training and all(m.training for m in scripted.modules())
    assert torch.allclose(mx.load_model(str(path), eval="never").predict(x), as_given, atol=1e-6)
    assert torch.allclose(mx.load_model(str(path)).predict(x), in_eval, atol=1e-6)
    assert scripted.training                                       # left as found


def test_analyses_take_the_model_object_not_parallel_keywords():
    from medexplain.segmentation.shapley import dice

    fns = [getattr(M, n) for n in M.available_metrics()] + [M.deletion_insertion, M.randomization_check,
                                                            channel_shapley, explain_instances, context_experiment,
                                                            evaluate]
    for fn in fns:
        assert not {"inferer", "output", "activation"} & set(inspect.signature(fn).parameters), fn.__name__
    x = torch.randn(1, 2, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    net = _net().eval()
    inst = mx.segmentation.Instance(torch.zeros(6, 6, 6, dtype=torch.bool).index_fill_(0, torch.tensor([2]), True),
                                    "TP", 36)
    # the model's activation is the one that reads probabilities: sigmoid over channel 1 instead of softmax
    soft = context_experiment(net, x, inst, d_max=1)
    sig = context_experiment(mx.Model(net, activation="sigmoid"), x, inst, d_max=1)
    with torch.no_grad():
        z = net(x)
    assert soft[0]["mean_probability"] == pytest.approx(float(torch.softmax(z, 1)[0, 1][inst.mask].mean()), abs=1e-6)
    assert sig[0]["mean_probability"] == pytest.approx(float(torch.sigmoid(z)[0, 1][inst.mask].mean()), abs=1e-6)
    ref = (torch.softmax(z, 1)[:, 1] > 0.5).long()
    shap_model = channel_shapley(mx.Model(net, activation="sigmoid"), x, dice(1, ref, channel=1, soft=True))
    shap_given = channel_shapley(net, x, dice(1, ref, activation="sigmoid", channel=1, soft=True))
    torch.testing.assert_close(shap_model.values, shap_given.values)


def test_an_eval_network_in_a_model_is_not_reported_as_mixed():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).eval()
    x = torch.rand(1, 1, 8, 8)
    assert "eval" not in mx.explain(net, x, "saliency", target=0).info
    net[0].train()
    assert "mixed" in mx.explain(net, x, "saliency", target=0).info["eval"]
    net.train()
    assert "switched to eval" in mx.explain(net, x, "saliency", target=0).info["eval"]
    assert all(m.training for m in net.modules())


def test_demo_and_train_refuse_a_missing_device_before_any_work(tmp_path):
    from medexplain.pipelines.demo import run_demo

    for bad in ("tpu", "cuda:99"):
        with pytest.raises(InputError, match="device"):
            run_demo(tmp_path / "demo", size="small", device=bad)
    assert not (tmp_path / "demo").exists()
