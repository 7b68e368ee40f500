"""The demo pipeline (``medexplain.pipelines.demo``, run by ``medexplain demo``): outputs on the small configuration,
the method choice through the registry, and, on the demo configuration, the gradient methods beating
the random baseline on the planted nodules (trains classifiers: slow-marked)."""
import json

import nibabel as nib
import pytest
import torch
from scipy import stats

import medexplain as mx
from medexplain.cli import app
from medexplain.models import zoo
from medexplain.pipelines.demo import choose_methods, run_demo


def test_demo_command_is_registered():
    from typer.testing import CliRunner
    res = CliRunner().invoke(app, ["demo", "--help"])
    assert res.exit_code == 0 and "--out" in res.output


def test_default_methods_are_those_that_apply_to_the_classifier():
    torch.manual_seed(0)
    net = zoo.classifier_2d(1, 2, widths=(4, 4, 4, 4)).eval()
    x = torch.rand(2, 1, 32, 32)
    names, skipped = choose_methods(net, x)
    assert names == mx.available_methods(model=net, x=x) and skipped == {}
    assert "patchnet" not in names and {"saliency", "gradcam", "integrated_gradients"} <= set(names)
    names, skipped = choose_methods(net, x, ["saliency", "patchnet", "no_such_method"])
    assert names == ["saliency"] and set(skipped) == {"patchnet", "no_such_method"}
    assert "PatchNet" in skipped["patchnet"] and "unknown method" in skipped["no_such_method"]


@pytest.mark.slow
def test_demo_small_writes_report_maps_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEXPLAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    res = run_demo(out, size="small", n_cases=2, methods=["saliency", "gradcam", "no_such_method", "patchnet"],
                   progress=False)
    assert (out / "report.html").exists() and res["report"] == str(out / "report.html")
    assert [r["method"] for r in res["rows"]] == ["saliency", "gradcam"]
    assert set(res["skipped"]) == {"no_such_method", "patchnet"}
    masks = torch.stack([torch.from_numpy(nib.load(str(out / "maps" / f"case{i}_mask.nii.gz")).get_fdata()[..., 0])
                         for i in range(2)]) > 0
    assert res["random_baseline"] == pytest.approx(float(masks.double().mean()), abs=1e-12)
    for r in res["rows"]:                       # the reported hits are those of the written maps on the masks
        maps = torch.stack([torch.from_numpy(nib.load(str(out / "maps" / f"case{i}_{r['method']}.nii.gz")).get_fdata())
                            for i in range(2)])[:, None, ..., 0]
        hits = mx.metrics.hit_rate(maps, masks)
        assert r["hits"] == f"{int(hits.sum())}/2" and r["hit rate"] == pytest.approx(float(hits.mean()))
        anyp = mx.metrics.hit_rate(maps, masks, ties="any")
        assert r["hits (any maximal pixel)"] == f"{int(anyp.sum())}/2" and (anyp >= hits).all()
        at_max = (maps.flatten(1) == maps.flatten(1).amax(1, keepdim=True)).sum(1).double()
        assert r["maximal pixels (median)"] == float(at_max.median()) and r["pixels"] == 32 * 32
        assert r["random baseline"] == res["random_baseline"] and maps.shape[-2:] == (32, 32)
        assert maps.abs().amax() > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["cached"] is False and metrics["rows"] == json.loads(json.dumps(res["rows"]))
    doc = (out / "report.html").read_text()
    assert "random baseline" in doc and "labels are planted" in doc and doc.count("<img ") == 2 * 3
    assert "Skipped no_such_method" in doc and "Skipped patchnet" in doc
    res2 = run_demo(out, size="small", n_cases=2, methods=["saliency"], progress=False)
    assert res2["cached"] is True and res2["cache_path"] == res["cache_path"]   # second run does not retrain
    assert res2["rows"][0]["hit rate"] == res["rows"][0]["hit rate"] and res2["accuracy"] == res["accuracy"]
    assert "Skipped" not in (out / "report.html").read_text()


@pytest.mark.slow
def test_gradient_methods_beat_the_random_baseline_on_the_planted_nodules(tmp_path, monkeypatch):
    """The demo configuration's classifier (1200 planted images, about a minute of training on two cores):
    the gradient methods' maxima fall inside the planted nodule far more often than a uniformly random
    point (one-sided binomial test against the baseline hit probability, p < 1e-3)."""
    monkeypatch.setenv("MEDEXPLAIN_CACHE", str(tmp_path / "cache"))
    methods = ["saliency", "smoothgrad", "integrated_gradients"]
    res = run_demo(tmp_path / "out", size="demo", n_cases=8, methods=methods, progress=False)
    assert res["accuracy"] > 0.9 and res["n_cases"] == 8
    base = res["random_baseline"]
    assert 0 < base < 0.05
    for r in res["rows"]:
        hits, n = map(int, r["hits"].split("/"))
        assert n == 8 and r["hit rate"] > base, r
        assert stats.binom.sf(hits - 1, n, base) < 1e-3, r              # P(at least this many hits by chance)
    assert [r["method"] for r in res["rows"]] == methods


# --- issue 25: progress and an estimate from the measured first calls ------------------------------------
class FakeBar:
    def __init__(self):
        self.tasks, self.updates, self.removed = [], {}, []

    def add_task(self, name, total=None):
        self.tasks.append((name, total))
        return name

    def update(self, task, completed, total):
        self.updates[task] = (completed, total)

    def remove_task(self, task):
        self.removed.append(task)


def test_the_estimate_extrapolates_the_per_row_time_measured_after_the_first_call(monkeypatch):
    from medexplain.pipelines import demo
    clock = iter([0.0, 3.0, 3.5, 4.0, 5.0])              # start; after call 1 (warm-up), calls 2, 3, 4
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    said, bar = [], FakeBar()
    prog = demo.MethodProgress("kernelshap", 50, bar, said.append)
    prog.rows(10)
    assert prog.estimate is None                         # one call: its time includes the warm-up
    prog.rows(5)
    assert prog.estimate is None                         # 5 rows since the first call: under 20 % of 50
    prog.rows(5)                                         # 10 rows in 1 s after the first call: 0.1 s per row
    assert prog.estimate == pytest.approx(4.0 + 0.1 * 30)
    assert said == ["  kernelshap: ~7 s estimated from its first 20 of 50 rows (100.0 ms per row)"]
    prog.rows(10)
    assert len(said) == 1 and bar.updates["kernelshap"] == (30, 50)


def test_slow_methods_report_progress_over_all_their_rows(tmp_path, monkeypatch):
    """Each method's bar counts its rows over every case the one case pipeline explains, against the total its
    cost model expects for the whole set."""
    from medexplain.engine.options import estimate_passes
    from medexplain.engine.registry import get_method
    from medexplain.pipelines import demo
    torch.manual_seed(0)
    net = zoo.classifier_2d(1, 2, widths=(4, 4, 4, 4)).eval()
    x, masks = torch.rand(2, 1, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 10:14, 10:14] = True
    cases = demo.write_cases(tmp_path, x, masks)
    bar = FakeBar()
    monkeypatch.setattr(demo, "_progress_bar", lambda progress: __import__("contextlib").nullcontext(bar))
    small = {"kernelshap": {"n_samples": 12}, "lime": {"n_samples": 12}, "medcam": {"steps": 3}}
    declared = demo.method_options           # each method's declared preview, with fewer samples / steps here
    monkeypatch.setattr(demo, "method_options", lambda name, model, px: {**declared(name, model, px), **small[name]})
    res = demo.score_methods(net, cases, masks, ["kernelshap", "lime", "medcam"], progress=True)
    for row in res.rows:
        name = row["method"]
        total = estimate_passes(name, get_method(name).fn, x.shape, demo.method_options(name, net, 32))[0]
        assert (name, total) in bar.tasks and bar.updates[name][0] == row["rows"]
        if name == "medcam":       # early stopping and its final passes: the expected rows are a guide, the bar follows
            assert 0.5 * total <= row["rows"] <= 1.5 * total
        else:
            assert row["rows"] == total and bar.updates[name] == (total, total)
    assert bar.removed == ["kernelshap", "lime", "medcam"]


def test_progress_is_quiet_when_stderr_is_not_a_terminal_unless_asked():
    from rich.progress import Progress

    from medexplain.pipelines import demo
    with demo._progress_bar(None) as bar:                 # pytest captures stderr: not a terminal
        assert bar is None
    assert isinstance(demo._progress_bar(True), Progress)
    with demo._progress_bar(False) as bar:
        assert bar is None


def test_the_demo_explains_each_case_through_the_one_case_pipeline(tmp_path, monkeypatch):
    """Each test image of the demo is a case file explained by ``pipelines.explain_case`` (the pipeline of
    ``explain`` and ``run``), each method through its explain stage ``pipelines.explain_method`` (a CAM twice:
    aligned and bilinear), seeded as ``run`` seeds its cases; the maps are that stage's, written beside the cases."""
    from medexplain import pipelines
    from medexplain.pipelines import demo
    torch.manual_seed(0)
    net = zoo.classifier_2d(1, 2, widths=(4, 4, 4, 4)).eval()
    x, masks = torch.rand(2, 1, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 10:14, 10:14] = True
    cases = demo.write_cases(tmp_path, x, masks)
    calls, stage = [], pipelines.explain_method

    def spy(net_, x_, method, target, options, **kw):
        calls.append((method, tuple(x_.shape), options.get("upsample"), kw.get("seed")))
        return stage(net_, x_, method, target, options, **kw)

    monkeypatch.setattr(pipelines, "explain_method", spy)
    res = demo.score_methods(net, cases, masks, ["saliency", "gradcam"], seed=3)
    one = (1, 1, 32, 32)
    assert calls == [("saliency", one, None, 3)] * 2 + [("gradcam", one, None, 3)] * 2 + [("gradcam", one, "bilinear", 3)] * 2
    for i in range(2):
        want, _ = stage(net, x[i:i + 1], "saliency", 1, {})
        assert torch.equal(res.maps["saliency"][i], want.map[0])
        written = torch.from_numpy(nib.load(str(tmp_path / f"case{i}_saliency.nii.gz")).get_fdata()).float()
        assert torch.equal(written[..., 0], want.map[0, 0])
    assert res.rows[0]["rows"] == 2          # saliency: one forward per case, counted by the stage over the cases
