"""The file-to-file pipelines behind the commands, called from Python: contrast Shapley values of fold
models with their consensus (``medexplain.segmentation.shapley.fold_consensus``), and lesion instances."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medexplain.errors import InputError
from medexplain.metrics.ranking import rank_agreement, rank_uncertainty
from medexplain.pipelines import contrast_shapley, explain_lesion_instances, shapley_value_function
from medexplain.segmentation.shapley import ShapleyResult, channel_shapley, fold_consensus


def _result(values, players=("T1", "T2", "FLAIR")):
    v = torch.tensor([values], dtype=torch.float64)
    return ShapleyResult(v, list(players), [(i,) for i in range(v.shape[1])], {}, "exact", 8)


def test_fold_consensus_by_hand():
    folds = [_result([0.1, 0.5, 0.3]), _result([0.2, 0.1, 0.6]), _result([0.0, 0.4, 0.5])]
    c = fold_consensus(folds, reference_ranking=["FLAIR", "T2", "T1"])
    r = c["ranking"]
    assert r["per_model"] == [["T2", "FLAIR", "T1"], ["FLAIR", "T1", "T2"], ["FLAIR", "T2", "T1"]]
    assert r["mean_values"] == pytest.approx({"T1": 0.1, "T2": 1 / 3, "FLAIR": 1.4 / 3})
    assert r["consensus"] == ["FLAIR", "T2", "T1"] and r["n_evaluations"] == [8, 8, 8]
    values = torch.cat([f.values for f in folds])
    agr = rank_agreement(values, [2, 1, 0])
    assert c["agreement"]["reference"] == ["FLAIR", "T2", "T1"]
    assert [m["kendall_tau"] for m in c["agreement"]["per_model"]] == pytest.approx(agr["kendall_tau"].tolist())
    assert c["agreement"]["per_model"][2]["kendall_tau"] == pytest.approx(1.0)
    # ranks per fold: T1 3,2,3  T2 1,3,2  FLAIR 2,1,1 -> population variances 2/9, 2/3, 2/9
    assert c["uncertainty"]["per_contrast"] == pytest.approx({"T1": 2 / 9, "T2": 2 / 3, "FLAIR": 2 / 9})
    assert c["uncertainty"]["rank_variance"] == pytest.approx(float(rank_uncertainty(values[:, None])[0]))
    one = fold_consensus(folds[:1])
    assert one["agreement"] is None and one["uncertainty"] is None
    with pytest.raises(InputError):
        fold_consensus([folds[0], _result([1.0, 2.0, 3.0], players=("a", "b", "c"))])


def _unet(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 1)).double()


def test_contrast_shapley_writes_values_and_consensus(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    np.save(tmp_path / "case.npy", img.numpy())
    seg = (img[2] > 0).long()
    nib.save(nib.Nifti1Image(seg.numpy().astype(np.int16), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    models = [_unet(0), _unet(1)]
    seen = []
    res = contrast_shapley(tmp_path / "case.npy", models, tmp_path / "out", contrasts=["T1", "T2", "FLAIR"],
                           reference_ranking="FLAIR,T2,T1", value="dice:1", seg=tmp_path / "seg.nii.gz",
                           on_model=lambda i, r: seen.append(i))
    assert seen == [0, 1] and res.players == ["T1", "T2", "FLAIR"]
    direct = channel_shapley(models[1], img.float()[None].double(), shapley_value_function("dice:1", seg[None]))
    torch.testing.assert_close(res.results[1].values, direct.values, rtol=0, atol=1e-9)
    assert {p.name for p in res.files} == {"values.csv", "coalitions.csv", "ranking.json", "agreement.json",
                                           "uncertainty.json"}
    rows = list(csv.DictReader(open(tmp_path / "out" / "values.csv")))
    assert len(rows) == 6 and rows[0]["spec"] == "Sequential" and rows[0]["stderr"] == ""
    ranking = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert ranking["consensus"] == res.consensus["ranking"]["consensus"] and ranking["value"] == "dice:1"
    with pytest.raises(InputError, match="2 contrasts"):
        contrast_shapley(tmp_path / "case.npy", models, tmp_path / "o2", contrasts=["T1", "T2"])
    with pytest.raises(InputError, match="--baseline"):
        contrast_shapley(tmp_path / "case.npy", models, tmp_path / "o2", baseline="median")
    with pytest.raises(InputError, match="needs the reference label map"):
        shapley_value_function("dice:WT")


def test_lesion_instances_without_a_lesion_writes_the_probability_only(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))

    class Background(nn.Module):                                        # always predicts background
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1)
            nn.init.zeros_(self.conv.weight)
            self.conv.bias.data = torch.tensor([5.0, -5.0])

        def forward(self, x):
            return self.conv(x)

    res = explain_lesion_instances(tmp_path / "v.nii.gz", Background(), tmp_path / "out")
    assert res.instances == [] and res.rows == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["info.json", "instances.csv", "instances.nii.gz",
                                                                      "probability.nii.gz"]
    prob = nib.load(str(tmp_path / "out" / "probability.nii.gz")).get_fdata()
    assert np.allclose(prob, torch.softmax(torch.tensor([5.0, -5.0]), 0)[1].item(), atol=1e-6)
    with pytest.raises(Exception, match="channel 3"):
        explain_lesion_instances(tmp_path / "v.nii.gz", Background(), tmp_path / "o2", channel=3)


def test_instances_and_shapley_are_the_one_case_pipeline(tmp_path, monkeypatch):
    """``instances`` runs ``pipelines.explain_case`` once, its target the lesion instances found by a hook on the
    prediction (a ``Regions`` target); ``shapley`` runs it once per fold model with its value target. Their maps
    and values are those of the instance and contrast-Shapley APIs on the same model and image."""
    from medexplain import pipelines
    from medexplain import segmentation as seg
    from medexplain.engine.targets import Regions
    from medexplain.pipelines import CaseState, explain_case

    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 6, 6, 6, generator=g)
    np.save(tmp_path / "case.npy", img.numpy())
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:3, 1:3, 1:3], mask[4:6, 3:6, 4:6] = 1, 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    calls = []

    def case(model, images, methods, writer, **kw):
        st = explain_case(model, images, methods, writer, state=CaseState(list(images)), **kw)
        calls.append((type(writer).__name__, callable(kw["target"]), type(st.resolved.target).__name__))
        return st

    for module in (pipelines.instances, pipelines.shapley):   # the one case pipeline, as each command calls it
        monkeypatch.setattr(module, "explain_case", case)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 1)).eval()
    res = explain_lesion_instances(tmp_path / "case.npy", net, tmp_path / "inst", region=tmp_path / "mask.nii.gz",
                                   n_samples=3)
    assert calls == [("InstanceWriter", True, Regions.__name__)] and len(res.instances) == 2
    api = seg.explain_instances(net, img[None], res.instances, channel=res.info["class"], n_samples=3)
    for k, inst in enumerate(res.instances, start=1):
        written = nib.load(str(tmp_path / "inst" / f"instance_{k:03d}_{inst.kind or 'pred'}.nii.gz")).get_fdata()
        assert np.allclose(np.moveaxis(written, -1, 0), api.map[k - 1].numpy(), atol=1e-7)
    calls.clear()
    models = [_unet(0).float(), _unet(1).float()]
    sh = contrast_shapley(tmp_path / "case.npy", models, tmp_path / "shap")
    assert [c[:2] for c in calls] == [("ShapleyWriter", True)] * 2
    for m, r in zip(models, sh.results):
        direct = channel_shapley(m, img[None], shapley_value_function("probability:1", activation="softmax"))
        torch.testing.assert_close(r.values, direct.values, rtol=0, atol=1e-12)
