"""The method registry: ``applies_to`` predicates and ``mx.available_methods(model=..., x=...)``, so callers
ask which methods fit a model instead of special-casing names (docs/design.md, "The registry")."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import medexplain as mx
from conftest import image, make
from medexplain.engine import core
from medexplain.engine.registry import Method, classifier_only, get_method
from medexplain.errors import UnsupportedModelError
from medexplain.models.patchnet import PatchNet

CAMS = {"gradcam", "gradcam++", "eigencam"}
ALL = {"saliency", "smoothgrad", "integrated_gradients", "occlusion", "gradcam", "gradcam++", "eigencam", "ssplain",
       "medcam", "patchnet"}


def _patchnet():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))
    return PatchNet(backbone, 4).double().eval()


def test_every_method_is_registered_once():
    names = mx.available_methods()
    assert len(names) == len(set(names)) and ALL <= set(names)
    assert all(get_method(n).name == n for n in names)


def test_plain_cnn_gets_no_patchnet_and_a_segmenter_no_classifier_only_method():
    full = set(mx.available_methods())
    cls, x = make("cls", 2), image(2, b=1)
    got = set(mx.available_methods(model=cls, x=x))
    assert "patchnet" not in got and ALL - {"patchnet"} <= got
    seg = make("seg", 2)
    got_seg = set(mx.available_methods(model=seg, x=x))
    assert not {"patchnet", "medcam"} & got_seg and ALL - {"patchnet", "medcam"} <= got_seg
    # every exclusion comes with the method's own reason
    out = seg(x)
    assert all(get_method(n).why_not(seg, out) for n in full - got_seg)
    # without a probe batch the output is unknown: only what the model itself says is used
    assert "medcam" in set(mx.available_methods(model=seg)) and "patchnet" not in set(mx.available_methods(model=seg))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_model_gets_no_hook_method():
    x = image(2, b=1)
    scripted = torch.jit.trace(make("cls", 2), x)
    got = set(mx.available_methods(model=scripted, x=x))
    assert {"saliency", "smoothgrad", "integrated_gradients", "occlusion", "ssplain"} <= got
    assert not got & CAMS and "medcam" not in got
    assert not any(get_method(n).needs_hooks for n in got)
    reason = get_method("gradcam").why_not(scripted)
    assert "TorchScript" in reason


def test_patchnet_applies_to_patchnets_also_through_the_output_adapter():
    net, x = _patchnet(), image(2, b=2, size=8)
    assert "patchnet" in mx.available_methods(model=net, x=x)
    spec = get_method("patchnet")
    assert spec.applies_to(net) and spec.applies_to(core.OutputAdapter(net, 0))
    assert "PatchNet" in spec.why_not(make("cls", 2))
    a = mx.explain(net, x, "patchnet", target=1)
    b = mx.explain(mx.Model(net, output=lambda out: out), x, "patchnet", target=1)        # wrapped: same map
    torch.testing.assert_close(a.map, b.map)
    assert a.method == "patchnet" and a.info["patch_size"] == (4, 4)
    with pytest.raises(UnsupportedModelError, match="PatchNet"):
        mx.explain(make("cls", 2), image(2, b=1), "patchnet", target=0)


def test_applies_to_predicates():
    assert classifier_only(None, torch.zeros(2, 3)) is None
    assert "logits (B, K)" in classifier_only(None, torch.zeros(2, 3, 4, 4))
    assert classifier_only(None, None) is None                                  # unknown output: not excluded
    assert get_method("medcam").why_not(make("seg", 2), torch.zeros(1, 2, 12, 12)) is not None
    assert get_method("medcam").applies_to(make("cls", 2), torch.zeros(1, 3))
    assert get_method("saliency").applies_to(make("seg", 2), torch.zeros(1, 2, 12, 12))
    only_3d = Method("only3d", lambda model, x, target, cost: None,
                     predicate=lambda model, out: None if out is not None and out.ndim == 5 else "3D only")
    assert only_3d.why_not(None, torch.zeros(1, 2, 4, 4)) == "3D only" and only_3d.applies_to(None, torch.zeros(1, 2, 4, 4, 4))
    hooked = Method("hooked", lambda model, x, target, cost: None, needs_hooks=True)
    assert hooked.applies_to(make("cls", 2)) and not hooked.applies_to(torch.jit.script(make("cls", 2)))


def test_available_methods_leaves_the_model_as_found():
    model = make("cls", 2)
    model.train()
    mx.available_methods(model=model, x=image(2, b=1))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_models_patchnet_holds_the_model_only():
    """The PatchNet explainer lives under methods/; models/patchnet.py imports no registry, explain or method."""
    src = Path(__file__).resolve().parents[1] / "src" / "medexplain" / "models" / "patchnet.py"
    imported = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {m for m in imported if {"registry", "explain", "methods"} & set(m.lstrip(".").split("."))}
    assert get_method("patchnet").fn.__module__ == "medexplain.methods.patchnet"


# ------------------------------------------------------------------ no method name is special-cased in code

PKG = Path(__file__).resolve().parents[1] / "src" / "medexplain"

#: Quoted registered names in code outside their own module that are not special cases, each with its reason.
ALLOWED = {
    ("models/__init__.py", "patchnet"): "the module medexplain.models.patchnet, lazily imported by name",
    ("methods/captum_methods.py", "smoothgrad"): "Captum's NoiseTunnel type 'smoothgrad' (nt_type), not the method",
    ("methods/captum_methods.py", "saliency"): "noise_tunnel's default base method: an option value naming a method",
}


def _docstrings(tree) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions (prose, not code), and of the
    entries of ``__all__`` (Python names, e.g. the pipeline function ``contrast_shapley``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            out.update(id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _quoted_names_in_code():
    from medexplain.engine.registry import _ALIASES
    own = {n: m.fn.__module__ for n, m in mx.explain.__globals__["registered"]().items()}
    own.update({a: own[n] for a, n in _ALIASES.items()})
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        module = "medexplain." + rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                    and node.value in own and module not in (own[node.value], "medexplain.engine.registry")):
                found.append((rel, node.value, node.lineno))
    return found


def test_no_method_name_is_special_cased_in_code_outside_its_own_module():
    """Every registered name and alias, as a string constant in code (docstrings are prose), appears only in
    the module that registers it and in registry.py; the few others are listed with their reason."""
    found = _quoted_names_in_code()
    unexplained = [f for f in found if (f[0], f[1]) not in ALLOWED]
    assert not unexplained, f"method names special-cased outside their module: {unexplained}"
    stale = set(ALLOWED) - {(f[0], f[1]) for f in found}
    assert not stale, f"allowed entries that no longer occur (remove them): {stale}"


def test_the_name_check_catches_a_special_case(tmp_path, monkeypatch):
    """The check above can fail: a module comparing against a method's name is reported."""
    fake = tmp_path / "medexplain"
    (fake / "methods").mkdir(parents=True)
    (fake / "demo.py").write_text('"""Mentions "occlusion" in prose only."""\nX = {"occlusion": 1}\n')
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert _quoted_names_in_code() == [("demo.py", "occlusion", 2)]


def test_declarations_where_the_methods_are_defined():
    """Aliases, the default method, choices as ``Literal`` types, the sliding-window handling and the family
    are declared at registration and read from the registry, never from lists of names elsewhere."""
    from medexplain.engine.options import describe_type, option_types
    from medexplain.engine.registry import FAMILIES, default_method, registered
    from medexplain.engine.sliding_cam import windowed_cam, windowed_method

    assert get_method("gradcampp").name == "gradcam++" and get_method("ig").name == "integrated_gradients"
    assert get_method(get_method("smoothgrad").fn) is get_method("smoothgrad")       # the function itself
    model, x = make("cls", 2), image(2, b=1)
    assert mx.explain(model, x, target=0).method == default_method() == "saliency"
    rule = option_types(get_method("integrated_gradients").fn)["rule"][0]
    assert describe_type(rule).startswith("one of gausslegendre, riemann_left")
    for spec in registered().values():
        assert spec.family in FAMILIES and spec.fn.spec is spec
        assert not (spec.windowed_cam and spec.no_sliding)
        if spec.no_sliding:
            with pytest.raises(UnsupportedModelError, match=spec.no_sliding.split(" ")[0]):
                windowed_method(spec)
        elif spec.windowed_cam:
            assert spec.family == "CAM" and windowed_method(spec).__name__ == windowed_cam(spec).__name__
        else:
            assert windowed_method(spec) is spec.fn
    assert {n for n, m in registered().items() if m.no_sliding} == {"scorecam", "ablationcam"}
