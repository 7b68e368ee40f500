"""Typed method options (medexplain.engine.options): parsed from text for the CLI and manifests, checked (never
converted silently) for the API, ranges and choices enforced, unknown names with close matches; and the
cost estimate, which must equal the rows the methods really send through the model."""
import pytest
import torch

import medexplain as mx
from conftest import image, make
from medexplain import errors
from medexplain.engine.options import (
    CountingModel,
    check_options,
    estimate_cost,
    estimate_passes,
    option_types,
    parse_pairs,
)
from medexplain.engine.registry import get_method, route_options


def opts(method, text=False, **kw):
    spec = get_method(method)
    return check_options(spec.name, spec.fn, kw, text=text)


@pytest.mark.parametrize("word, value", [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True),
                                         ("NO", False), ("on", True), ("off", False)])
def test_booleans_from_text(word, value):
    assert opts("saliency", text=True, abs=word) == {"abs": value}


def test_text_is_typed_by_the_signature():
    got = opts("smoothgrad", text=True, n_samples="20", sigma="0.1", chunk_size="none", squared="true")
    assert got == {"n_samples": 20, "sigma": 0.1, "chunk_size": None, "squared": True}
    assert type(got["sigma"]) is float and type(got["n_samples"]) is int
    assert opts("ssplain", text=True, k="3,4") == {"k": (3, 4)}             # int | Sequence[int] | None
    assert opts("ssplain", text=True, k="3") == {"k": 3}
    assert opts("occlusion", text=True, window="4,4,2") == {"window": (4, 4, 2)}  # unannotated: numbers
    assert opts("integrated_gradients", text=True, rule="riemann_middle") == {"rule": "riemann_middle"}


@pytest.mark.parametrize("method, kw, words", [
    ("saliency", {"abs": "maybe"}, "abs must be a boolean"),
    ("integrated_gradients", {"steps": "abc"}, "steps must be an integer, got 'abc'"),
    ("smoothgrad", {"n_samples": "2.5"}, "n_samples must be an integer"),
    ("smoothgrad", {"sigma": "lots"}, "sigma must be a number"),
    ("smoothgrad", {"noise": "zeros"}, "Tensor (from Python only)"),
])
def test_bad_text_is_a_typed_error(method, kw, words):
    with pytest.raises(errors.OptionError) as e:
        opts(method, text=True, **kw)
    assert words in str(e.value)


@pytest.mark.parametrize("method, kw, words", [
    ("smoothgrad", {"n_samples": "10"}, "n_samples must be an integer, got '10' (str) (from Python"),
    ("saliency", {"abs": "false"}, "abs must be a boolean"),
    ("smoothgrad", {"n_samples": 2.5}, "n_samples must be an integer, got 2.5"),
    ("integrated_gradients", {"steps": True}, "steps must be an integer, got True"),
    ("smoothgrad", {"sigma": "0.1"}, "sigma must be a number"),
])
def test_python_values_are_checked_not_converted(method, kw, words):
    with pytest.raises(errors.OptionError) as e:
        opts(method, **kw)
    assert words in str(e.value)


@pytest.mark.parametrize("method, kw, words", [
    ("smoothgrad", {"n_samples": 0}, "n_samples must be >= 1, got 0"),
    ("integrated_gradients", {"steps": 0}, "steps must be >= 1"),
    ("smoothgrad", {"chunk_size": 0}, "chunk_size must be >= 1 (or none"),
    ("occlusion", {"chunk_size": -3}, "chunk_size must be >= 1"),
    ("smoothgrad", {"sigma": -0.1}, "sigma must be >= 0"),
    ("integrated_gradients", {"rule": "simpson"}, "rule must be one of"),
    ("gradcam++", {"variant": "monia"}, "did you mean 'monai'"),
    ("integrated_gradients", {"steps": 100000}, "74.5 GiB"),
])
def test_ranges_choices_and_memory(method, kw, words):
    with pytest.raises(errors.OptionError) as e:
        opts(method, **kw)
    assert words in str(e.value)
    assert opts("integrated_gradients", steps=100000, rule="riemann_middle")["steps"] == 100000


def test_unknown_option_names_close_matches():
    with pytest.raises(errors.OptionError, match="Did you mean n_samples"):
        opts("smoothgrad", n_sampels=3)
    with pytest.raises(errors.OptionError, match=r"no chosen method accepts option\(s\) \['stepz'\].*Did you mean steps"):
        route_options(["saliency", "integrated_gradients"], {"stepz": "3"})


def test_route_options_types_each_method_by_its_own_signature():
    routed = route_options(["smoothgrad", "integrated_gradients"], {"chunk_size": "8", "steps": "4",
                                                                     "smoothgrad.n_samples": "3"})
    assert routed == {"smoothgrad": {"chunk_size": 8, "n_samples": 3}, "integrated_gradients": {"chunk_size": 8, "steps": 4}}


def test_parse_pairs_keeps_text_and_rejects_a_missing_equals():
    assert parse_pairs(["abs=false", " steps = 4"]) == {"abs": "false", "steps": "4"}
    with pytest.raises(errors.OptionError, match="key=value"):
        parse_pairs(["steps"])


def test_api_explain_uses_the_same_checks():
    model, x = make("cls", 2), image(2, b=1)
    for kw, words in [({"n_samples": "10"}, "must be an integer"), ({"chunk_size": 0}, ">= 1"),
                      ({"n_sampels": 2}, "Did you mean n_samples")]:
        with pytest.raises(errors.OptionError, match=words):
            mx.explain(model, x, "smoothgrad", target=0, **kw)
    with pytest.raises(errors.OptionError, match="must be a boolean"):
        mx.explain(model, x, "saliency", target=0, abs="false")
    signed = mx.explain(model, x, "saliency", target=0, abs=False).map
    assert (signed < 0).any() and torch.equal(mx.explain(model, x, "saliency", target=0, abs=True).map, signed.abs())


def test_option_types_read_the_signature():
    t = option_types(get_method("smoothgrad").fn)
    assert t["n_samples"] == (int, 50) and t["chunk_size"][1] == 64 and "model" not in t


@pytest.mark.parametrize("method, kw", [("saliency", {}), ("smoothgrad", {"n_samples": 3, "chunk_size": 4}),
                                        ("integrated_gradients", {"steps": 5}),
                                        ("integrated_gradients", {"steps": 3, "completeness": False}),
                                        ("occlusion", {"window": 4, "stride": 3}),
                                        ("occlusion", {"window": (4, 6), "stride": None})])
def test_estimated_passes_equal_the_counted_rows(method, kw):
    model, x = make("cls", 2), image(2, b=2)
    attr = mx.explain(model, x, method, target=0, **kw)
    assert estimate_passes(method, get_method(method).fn, x.shape, kw) == (attr.info["n_forward"], attr.info["n_backward"])


def test_counting_model_reports_every_row_and_the_estimate_extrapolates():
    model, x = make("cls", 2), image(2, b=2)
    seen = []
    attr = mx.explain(CountingModel(model, None, seen.append), x, "smoothgrad", target=0, n_samples=5, chunk_size=4)
    assert sum(seen) == attr.info["n_forward"] == 10 and seen == [4, 4, 2]
    est = estimate_cost("smoothgrad", get_method("smoothgrad").fn, x.shape, {"n_samples": 5}, seconds_per_row=2.5)
    assert est.seconds == pytest.approx(2.5 * (10 + 2 * 10)) and est.long
    assert "10 forward and 10 backward" in est.describe()
    assert not estimate_cost("saliency", get_method("saliency").fn, x.shape, {}, 0.01).long
    assert estimate_cost("gradcam", get_method("gradcam").fn, x.shape, {}, 0.01).seconds is None
