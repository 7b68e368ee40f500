"""The shared mechanics of medexplain.engine.core: the one layer-capture utility and the one output adapter."""
import pytest
import torch
from torch import nn

import medexplain as mx
from conftest import no_hooks
from medexplain.engine import core
from medexplain.errors import InputError, LayerNotFoundError, UnsupportedModelError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3, padding=1)).eval()


def test_detach_capture_is_a_clone_unaltered_by_inplace_relu():
    net, x = _net(), torch.randn(2, 1, 8, 8)
    with core.capture_layers(net, ["0"]) as caps:
        net(x)
    conv_out = net[0](x)
    assert conv_out.min() < 0                                   # the in-place ReLU would have changed it
    torch.testing.assert_close(caps["0"].activation, conv_out)
    assert caps["0"].calls == 1 and not caps["0"].activation.requires_grad
    assert no_hooks(net)


def test_graph_capture_keeps_the_graph_and_leaf_capture_stops_the_backward():
    net, x = _net(), torch.randn(1, 1, 8, 8, requires_grad=True)
    with core.capture_layers(net, ["0"], mode="graph") as caps:
        out = net(x)
    (gx,) = torch.autograd.grad(caps["0"].activation.sum(), x)
    assert gx.abs().sum() > 0                                   # differentiable back to the input
    with core.capture_layer(net, "0", grad=True) as cap:
        out = net(x.detach())
    g = core.layer_gradient(out[:, 1].sum(), cap)
    assert g.shape == (1, 4, 8, 8) and cap.activation.is_leaf
    # the same gradient by hand: d/dA of conv2(relu(A)) summed over channel 1
    a = net[0](x.detach()).requires_grad_(True)
    (ref,) = torch.autograd.grad(net[2](torch.relu(a))[:, 1].sum(), a)
    torch.testing.assert_close(g, ref)


def test_capture_counts_calls_and_refuses_an_ambiguous_layer():
    shared = nn.Conv2d(1, 1, 3, padding=1)
    net = nn.Sequential(shared, shared).eval()
    with core.capture_layers(net, ["0"]) as caps:
        net(torch.randn(1, 1, 6, 6))
    assert caps["0"].calls == 2 and len(caps["0"].outputs) == 2
    with pytest.raises(UnsupportedModelError, match="called 2 times"):
        _ = caps["0"].activation
    assert no_hooks(net)


def test_layer_gradient_says_when_the_layer_does_not_affect_the_target():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.a(x), self.b(x)

    net = TwoHeads().eval()
    with core.capture_layer(net, "b", grad=True) as cap:
        out = core.select_output(net(torch.randn(1, 1, 6, 6)), 0)
    with pytest.raises(UnsupportedModelError, match="does not depend on layer 'b'"):
        core.layer_gradient(out.sum(), cap)
    with pytest.raises(LayerNotFoundError, match="Close matches"):
        with core.capture_layers(net, ["aa"]):
            pass
    assert no_hooks(net)


def test_hooks_removed_when_the_forward_raises():
    net = _net()
    with pytest.raises(RuntimeError):
        with core.capture_layers(net, ["0", "2"]):
            net(torch.randn(1, 3, 8, 8))                        # wrong channel count: conv raises
    assert no_hooks(net)


@pytest.mark.parametrize("output, expect", [(None, "first"), (1, "second"), (lambda o: o[1], "second")])
def test_select_output_tuple(output, expect):
    a, b = torch.zeros(1, 2), torch.ones(1, 2)
    if output is None:
        with pytest.warns(UserWarning, match="returned 2 outputs"):
            got = core.select_output((a, b), output)
    else:
        got = core.select_output((a, b), output)
    assert got is (a if expect == "first" else b)


def test_select_output_dict_tensor_and_errors():
    d = {"seg": torch.zeros(1, 2, 4, 4), "aux": torch.ones(1, 2)}
    assert core.select_output(d, "seg") is d["seg"]
    with pytest.raises(UnsupportedModelError, match="keys"):
        core.select_output(d)
    stacked = torch.arange(2 * 3 * 2 * 4.0).view(2, 3, 2, 4)    # (B, heads, K, *s), e.g. DynUNet training
    torch.testing.assert_close(core.select_output(stacked, 0, x_ndim=3), stacked[:, 0])   # input (B, C, s)
    with pytest.raises(UnsupportedModelError, match="3 stacked heads"):
        core.select_output(stacked, 3, x_ndim=3)
    for x_ndim in (4, None):                                    # not stacked heads (or not known to be): refused
        with pytest.raises(UnsupportedModelError, match="not stacked heads"):
            core.select_output(stacked, 0, x_ndim=x_ndim)
    with pytest.raises(UnsupportedModelError, match="out of range"):
        core.select_output((d["aux"],), 3)
    with pytest.raises(UnsupportedModelError, match="not a dict"):
        core.select_output(stacked, "seg")


def test_explain_output_option_explains_the_chosen_head():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head_a, self.head_b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            f = self.conv(x).mean((2, 3))
            return {"a": self.head_a(f), "b": self.head_b(f)}

    torch.manual_seed(0)
    net, x = Heads().eval(), torch.randn(2, 1, 8, 8)
    sal = mx.explain(mx.Model(net, output="b"), x, "saliency", target=1).map
    x_ = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(net(x_)["b"][:, 1].sum(), x_)
    torch.testing.assert_close(sal, ref)
    cam = mx.explain(mx.Model(net, output="b"), x, "gradcam", target=1, layer="conv")  # layer names are the user's
    assert cam.map.shape == (2, 1, 8, 8)
    assert no_hooks(net) and not any(p.requires_grad is False for p in net.parameters())


def test_all_finite_agrees_with_isfinite_for_nan_and_infinities_anywhere():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(2, 1, 5, 6, 7, generator=g).to(dtype)
        assert core.all_finite(x)
        for bad in (float("nan"), float("inf"), -float("inf")):
            for i in (0, 17, x.numel() - 1):
                y = x.clone()
                y.view(-1)[i] = bad
                assert not core.all_finite(y) and not torch.isfinite(y).all(), (dtype, bad, i)
    assert core.all_finite(torch.empty(0))
    with pytest.raises(InputError, match="NaN or Inf"):
        core.check_input(torch.full((1, 1, 4, 4), float("nan")))
