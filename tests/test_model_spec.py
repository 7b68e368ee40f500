"""``mx.ModelSpec`` (issue 23): a model described before it is loaded. Its check refuses contradicting sources
without importing torch; its load gives the Model ``mx.load_model`` builds from the same source (a spec string, a
list, a bundle, an nnU-Net folder); it survives JSON and pickle; ``pipelines.case_model`` is the one place a
pipeline's ``model`` argument becomes a Model; ``Flags.model_spec()`` builds it from the command line's flags."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain.errors import ModelLoadError, OptionError
from medexplain.models.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tinyseg():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 2, 1)).eval()


def tinyseg_b():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 2, 1)).eval()


#: (spec fields, words of the OptionError) of every contradiction check() refuses.
CONTRADICTIONS = [
    ({}, "give the model to explain"),
    ({"nnunet": "n", "bundle": "b"}, "one of --nnunet and --bundle"),
    ({"bundle": "b", "flip_axes": [0]}, "--flip-axes flips a --model"),
    ({"nnunet": "n", "flip_axes": [0]}, "--flip-axes flips a --model"),
    ({"nnunet": "n", "source": "m.pt"}, "--nnunet gives the model"),
    ({"nnunet": "n", "preprocessing": {"spacing": "1"}}, "--nnunet gives the model"),
    ({"nnunet": "n", "inferer": {"roi_size": 8}}, "--nnunet gives the model"),
    ({"bundle": "b", "weights": "w.pt"}, "--bundle gives the model"),
    ({"bundle": "b", "preprocessing": {"intensity": "zscore"}}, "--bundle gives the model"),
    ({"source": ["a", "b"], "weights": ["w"]}, "1 --weights for 2 --model"),
    ({"source": "a", "nnunet_options": {"folds": [0]}}, "for an nnU-Net model folder"),
]


@pytest.mark.parametrize("fields,words", CONTRADICTIONS)
def test_check_refuses_contradicting_sources(fields, words):
    with pytest.raises(OptionError, match=words):
        ModelSpec(**fields).check()


def test_check_and_the_command_lines_spec_import_no_torch():
    """check() (every contradiction) and Flags.model_spec() in a process where importing torch, NumPy or MONAI
    raises."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'numpy', 'monai', 'scipy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import medexplain as mx
from medexplain.errors import OptionError
from medexplain.cli.params import OPTIONS, EXPLAIN, Flags
cases = {CONTRADICTIONS!r}
for fields, words in cases:
    try:
        mx.ModelSpec(**fields).check()
    except OptionError as e:
        assert words in str(e), (fields, str(e))
    else:
        raise SystemExit(f'no error for {{fields}}')
flags = Flags({{n: OPTIONS[n].default for n in EXPLAIN}})
flags.update(model=['a.pt', 'b.pt'], flip_axes='0,2', roi_size='8', spacing='1,1,2', output='1', eval='never')
spec = flags.model_spec()
assert spec.source == ('a.pt', 'b.pt') and spec.flip_axes == (0, 2) and spec.inferer['roi_size'] == 8, spec
assert spec.preprocessing == {{'spacing': '1,1,2'}} and spec.output == 1 and spec.eval == 'never', spec
flags.update(bundle='bnd')
try:
    flags.model_spec()
except OptionError as e:
    assert '--bundle' in str(e) or '--flip-axes' in str(e)
else:
    raise SystemExit('no error for --bundle with --model')
assert 'torch' not in sys.modules
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def _same_model(a: mx.Model, b: mx.Model, x: torch.Tensor) -> None:
    assert a.n_passes == b.n_passes and a.flip_axes == b.flip_axes and len(a.networks) == len(b.networks)
    assert (a.inferer is None) == (b.inferer is None)
    torch.testing.assert_close(a.predict(x), b.predict(x), rtol=0, atol=0)


def test_load_of_a_spec_string_and_of_an_ensemble_is_load_model_of_the_same_source():
    x = torch.randn(1, 1, 5, 6, 4)
    one = ModelSpec(source="test_model_spec:tinyseg", eval="never")
    m = one.load()
    assert isinstance(m, mx.Model) and m.name == "test_model_spec:tinyseg" and m.eval_policy == "never"
    _same_model(m, mx.load_model("test_model_spec:tinyseg", eval="never"), x)
    ens = ModelSpec(source=["test_model_spec:tinyseg", "test_model_spec:tinyseg_b"], flip_axes=[0, 2],
                    inferer={"roi_size": 4, "overlap": 0.25})
    m = mx.load_model(ens)                      # load_model takes a spec too
    assert m.n_passes == 8 and m.name == "test_model_spec:tinyseg+test_model_spec:tinyseg_b"
    _same_model(m, mx.load_model([tinyseg(), tinyseg_b()], flip_axes=(0, 2), inferer={"roi_size": 4,
                                                                                         "overlap": 0.25}), x)
    with pytest.raises(ModelLoadError, match="spec.replace"):   # a spec's settings are its own
        mx.load_model(ens, flip_axes=(1,))


def test_load_of_a_bundle_spec_is_load_model_of_the_bundle_with_its_postprocessing(tmp_path):
    from test_bundle import make_bundle
    make_bundle(tmp_path / "b")
    spec = ModelSpec(bundle=tmp_path / "b")
    m = spec.load()
    want = mx.load_model(tmp_path / "b")
    assert m.inferer.roi_size == want.inferer.roi_size and m.preprocessing.active and m.postprocessing is not None
    assert type(m.origin).__name__ == "Bundle" and m.name == "bundle b"
    _same_model(m, want, torch.randn(1, 2, 8, 8, 8))
    assert ModelSpec(source=tmp_path / "b").load().postprocessing is not None   # a bundle folder as the source


def test_load_of_an_nnunet_spec_is_load_model_of_the_folder(tmp_path):
    pytest.importorskip("nnunetv2")
    from test_nnunet import write_folder
    folder = write_folder(tmp_path)
    spec = ModelSpec(nnunet=folder, nnunet_options={"folds": [0, 1], "use_mirroring": False})
    m = spec.load()
    want = mx.load_model(folder, folds=[0, 1], use_mirroring=False)
    assert type(m.origin).__name__ == "NnUNetModel" and m.origin.folds == (0, 1) and m.preprocessing is not None
    x = torch.randn(1, 2, *m.origin.patch_size)
    _same_model(m, want, x)
    assert [s.nnunet_options["folds"] for s in spec.members()] == [[0], [1]]   # one spec per fold


def test_json_pickle_replace_and_describe():
    spec = ModelSpec(source=["a.pt", "b.pt"], weights=[None, "w.pt"], output=1, flip_axes=[0, 1],
                     preprocessing={"spacing": "1,1,2"}, inferer={"roi_size": [8, 8, 8], "overlap": 0.5},
                     device="cpu", dtype="float64", eval="always")
    text = json.dumps(spec.to_dict())
    assert ModelSpec.from_dict(json.loads(text)) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    case = spec.replace(preprocessing={"spacing": "2"})
    assert case.preprocessing == {"spacing": "2"} and case.source == spec.source and spec.preprocessing == {"spacing": "1,1,2"}
    with pytest.raises(OptionError, match="no field"):
        spec.replace(colour="red")
    d = spec.describe()
    assert d["source"] == ["a.pt", "b.pt"] and d["flip_axes"] == [0, 1] and "activation" not in d   # defaults left out
    assert [m.source for m in spec.members()] == ["a.pt", "b.pt"] and spec.members()[1].weights == "w.pt"
    net = ModelSpec(source=tinyseg())
    assert net.describe() == {"source": "Sequential"} and not net.sendable and spec.sendable
    with pytest.raises(OptionError, match="JSON"):
        net.to_dict()


def test_case_model_is_the_one_turn_of_a_model_argument_into_a_model():
    from medexplain.pipelines import case_model
    m = mx.Model(tinyseg())
    assert case_model(m) is m
    assert isinstance(case_model(tinyseg()), mx.Model)
    assert case_model(ModelSpec(source="test_model_spec:tinyseg", flip_axes=[1])).flip_axes == (1,)
    assert case_model(["test_model_spec:tinyseg", "test_model_spec:tinyseg_b"]).n_passes == 2
    with pytest.raises(OptionError, match="give the model"):
        case_model(None)


#: The keyword arguments about the model that went into the model object (issue 23).
MODEL_KEYWORDS = {"weights", "output", "activation", "preprocessing", "inferer", "bundle", "nnunet", "nnunet_options",
                  "device", "flip_axes", "eval"}


def test_explain_run_and_the_pacs_path_take_the_model_and_nothing_else_about_it():
    import inspect

    from medexplain import pipelines
    from medexplain.io.pacs import explain_pacs
    from medexplain.pipelines.run import run_manifest
    fns = [pipelines.explain_image, pipelines.explain_case, pipelines.explain_method, pipelines.method_table,
           run_manifest, explain_pacs, mx.explain, mx.available_methods]
    for fn in fns:
        params = inspect.signature(fn).parameters
        assert not MODEL_KEYWORDS & set(params), (fn.__name__, sorted(MODEL_KEYWORDS & set(params)))
        assert "model" in params, fn.__name__
