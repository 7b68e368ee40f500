"""The one CLI declaration (issue 23): shared options agree across commands, booleans are flags, choices are
checked by the parser, the static method list is the registry's, ``run`` takes every option of ``explain``,
and every ``--help`` prints without importing torch, SciPy or the metrics."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medexplain.cli import app, params

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def text(res) -> str:
    """The output of a CLI call as one line of words (Rich's boxes and line breaks removed)."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", res.output).split())


def commands() -> dict:
    return dict(typer.main.get_command(app).commands)


def options(cmd) -> dict:
    """Visible options of a click command by parameter name."""
    return {p.name: p for p in cmd.params if p.param_type_name == "option" and not getattr(p, "hidden", False)}


def signature(p) -> tuple:
    """What must agree for one option in every command: flags, type (its annotation, parser and range), default,
    help, flag-ness, multiplicity."""
    t = p.type_descriptor
    parser = getattr(t.parameter_info, "parser", None)
    return (tuple(p.opts), tuple(p.secondary_opts), repr(t.annotation), getattr(parser, "__qualname__", None),
            p.min, p.max, repr(p.default), p.help, p.is_flag, p.multiple)


def test_every_option_shared_by_commands_has_one_name_type_default_and_help():
    by_flag: dict = {}
    for name, cmd in commands().items():
        for p in options(cmd).values():
            for flag in (*p.opts, *p.secondary_opts):
                by_flag.setdefault(flag, {})[name] = signature(p)
    shared = {f: sigs for f, sigs in by_flag.items() if len(sigs) > 1 and f != "--help"}
    assert {"--out", "--seed", "--method", "--model", "--device", "--target", "--activation"} <= set(shared)
    for flag, sigs in shared.items():
        assert len(set(sigs.values())) == 1, (flag, sigs)
    # every option that two commands take comes from the one declaration
    declared = {f for o in params.OPTIONS.values() for d in o.decls for f in d.split("/")}
    assert set(shared) <= declared, set(shared) - declared


def test_booleans_are_flag_pairs_and_choices_are_checked_by_the_parser(tmp_path):
    for name, cmd in commands().items():
        for p in options(cmd).values():
            if p.is_flag and p.name != "help":
                assert p.secondary_opts and p.secondary_opts[0].startswith("--no-"), (name, p.name)
    # --overwrite takes no value (once, `--overwrite true` was a value); a bad choice fails in the parser
    res = runner.invoke(app, ["explain", "x.nii", "--overwrite", "--activation", "tanh"])
    assert res.exit_code == 2 and "'tanh' is not one of" in text(res) and "Traceback" not in res.output
    res = runner.invoke(app, ["explain", "x.nii", "--method", "saliency,gradkam"])
    assert res.exit_code == 2 and "Did you mean gradcam" in text(res)
    res = runner.invoke(app, ["run", "m.csv", "--device", "tpu"])
    assert res.exit_code == 2 and "auto, cpu, cuda or cuda:N" in text(res)
    res = runner.invoke(app, ["explain", "x.nii", "--overlap", "1"])
    assert res.exit_code == 2 and "[0, 1)" in text(res)


def test_static_lists_equal_the_library():
    import medexplain as mx
    from medexplain.cli.shapley import SHAPLEY_VALUE_HELP
    from medexplain.engine import ops, registry
    from medexplain.models import transforms
    from medexplain.pipelines import SHAPLEY_VALUE_HELP as LIB_VALUE_HELP
    declared = params.declared_methods()                  # read from the @register declarations, no copy
    assert list(declared.names) == mx.available_methods()
    assert declared.aliases == registry._ALIASES
    assert declared.default == registry.default_method() and declared.instance_default == registry.default_method(True)
    assert params.INTENSITY_HELP == transforms.INTENSITY_HELP
    assert tuple(params.ACTIVATIONS) == tuple(ops.ACTIVATIONS)
    assert SHAPLEY_VALUE_HELP == LIB_VALUE_HELP
    from medexplain.io import dicom as dicom_out
    assert params.FORMATS == dicom_out.FORMATS


def test_run_accepts_every_option_of_explain():
    cmds = commands()
    explain = {p.name: p for p in cmds["explain"].params if p.param_type_name == "option"}
    run = {p.name: p for p in cmds["run"].params if p.param_type_name == "option"}
    assert len(explain) > 30
    for name, p in explain.items():
        assert name in run, name
        assert signature(run[name]) == signature(p), name
    # and the nnU-Net, bundle, sliding-window, target, transform and device flags are among them
    assert {"nnunet", "folds", "mirroring", "configuration", "bundle", "roi_size", "overlap", "sw_batch_size", "sw_mode",
            "activation", "output", "target", "region", "transform", "device", "layer", "option", "format",
            "dicom_reference", "dicom_threshold", "pacs", "pacs_netrc", "pacs_ca_bundle", "figure"} <= set(run)


def test_old_spellings_are_hidden_aliases():
    cmd = commands()["run"]
    hidden = [p for p in cmd.params if getattr(p, "hidden", False)]
    assert any("--methods" in p.opts for p in hidden)


def test_devices_are_checked_before_any_work(tmp_path):
    import torch

    from medexplain.errors import InputError
    from medexplain.models.model import resolve_device  # the one device rule, which the pipelines use
    assert resolve_device(None) is None and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")
    res = runner.invoke(app, ["explain", str(tmp_path / "x.nii"), "--model", "zoo:chest_xray", "--device",
                              f"cuda:{torch.cuda.device_count() + 3}", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "CUDA device" in text(res) and not (tmp_path / "o").exists()


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'scipy', 'monai', 'numpy') or name.startswith('medexplain.metrics'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['medexplain'] + sys.argv[1:]
from medexplain.cli import main
main()
"""


@pytest.mark.parametrize("command", [None, "explain", "run", "instances", "shapley", "evaluate", "demo", "train",
                                     "methods", "examples"])
def test_help_prints_without_torch(command):
    """Every --help in a process where importing torch (and SciPy, MONAI, NumPy, the metrics) raises."""
    args = [sys.executable, "-c", BLOCK, *([command] if command else []), "--help"]
    res = subprocess.run(args, capture_output=True, text=True, env={"PYTHONPATH": SRC, "COLUMNS": "200",
                                                                     "PATH": "/usr/bin:/bin"}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and "blocked" not in res.stdout + res.stderr
    if command in ("explain", "run"):
        assert "--device" in res.stdout and "--overwrite" in res.stdout and "--no-overwrite" in res.stdout
    assert set(commands()) == {"explain", "run", "instances", "shapley", "evaluate", "demo", "train", "methods",
                               "examples"}


def test_every_flag_in_the_cli_and_run_docs_exists():
    docs = Path(__file__).resolve().parents[1] / "docs"
    flags = {f for cmd in commands().values() for p in cmd.params if p.param_type_name == "option"
             for f in (*p.opts, *p.secondary_opts)} | {"--help", "--no-deps"}   # --no-deps: pip's
    for name in ("cli.md", "run.md"):
        text = re.sub(r"(?m)^ray .*$", "", (docs / name).read_text())     # `ray start --head ...` lines: Ray's flags
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert used and used <= flags, (name, sorted(used - flags))


def test_flags_are_checked_without_torch():
    """Parsing (method names, choices, devices) imports nothing heavy: a bad value is refused in the process
    where torch cannot be imported."""
    for args, words in ((["explain", "x.nii", "--method", "saliency,gradkam"], "Did you mean gradcam"),
                        (["run", "m.csv", "--activation", "tanh"], "is not one of"),
                        (["instances", "x.nii", "--device", "gpu"], "cuda:N")):
        res = subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, timeout=60,
                             env={"PYTHONPATH": SRC, "COLUMNS": "300", "PATH": "/usr/bin:/bin"})
        out = " ".join(re.sub(r"[\u2500-\u257f]", " ", res.stdout + res.stderr).split())
        assert res.returncode == 2 and words in out and "blocked" not in out, (args, out)


def test_every_command_line_in_the_docs_uses_existing_flags():
    """`medexplain <command> ...` lines (with their backslash continuations) in docs/*.md and the README."""
    root = Path(__file__).resolve().parents[1]
    flags = {f for cmd in commands().values() for p in cmd.params if p.param_type_name == "option"
             for f in (*p.opts, *p.secondary_opts)} | {"--help"}
    seen = 0
    for doc in [*sorted((root / "docs").glob("*.md")), root / "README.md"]:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if not re.search(r"\bmedexplain (" + "|".join(commands()) + r")\b", line):
                continue
            block, j = line, i
            while block.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                block += lines[j]
            unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", block)) - flags
            assert not unknown, (doc.name, unknown, block)
            seen += 1
    assert seen > 10
