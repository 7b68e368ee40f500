"""Device audit (issue 26): a tensor created in code that meets the model's inputs and outputs (methods, engine,
metrics, segmentation) is created on their device. There is no GPU here to catch a CPU tensor beside a CUDA
input, so this reads the source: every call of a torch factory that makes a new tensor (``torch.zeros``,
``torch.arange``, ``torch.tensor``, ...) must name its ``device=``, be moved at once (``torch.zeros(...).to(...)``),
draw from a seeded ``torch.Generator`` (a CPU generator gives the same numbers on every device; the draw is
moved where it is used), or be listed in :data:`HOST` with the reason it lives on the host. ``*_like`` and
``x.new_*`` take their tensor's device; ``torch.as_tensor`` keeps a tensor's device and converts host values,
so it is not a factory here."""
import ast
from pathlib import Path

import medexplain

SRC = Path(medexplain.__file__).parent
AUDITED = ("methods", "engine", "metrics", "segmentation")
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "range", "linspace", "logspace", "eye", "rand", "randn",
             "randint", "randperm", "normal", "tensor", "empty_strided", "sparse_coo_tensor"}

#: (file, enclosing function) -> why its factory calls create host tensors on purpose
HOST = {
    ("methods/cam_layers.py", "index_map"): "positions probed through the user's reshape= callable: index bookkeeping",
    ("methods/instance.py", "_as_regions"): "a target (mask, sample indices) is a host object, moved in resolve()",
    ("methods/ssplain.py", "ssplain"): "a target's class indices are host values (Class), moved in resolve()",
    ("methods/shapley.py", "shapley_weights"): "a constant table, built on the host and moved at its use",
    ("engine/targets.py", "__init__"): "a target's sample indices are host values, moved in resolve()",
    ("engine/targets.py", "resolve_target"): "a range check of a class index given by the user",
    ("engine/targets.py", "resolve"): "a range check of the class indices given by the user",
    ("metrics/perturbation.py", "road"): "the percentages of the result, returned on the CPU",
    ("metrics/randomisation.py", "random_logit"): "a result from Python numbers, returned on the CPU",
    ("metrics/ranking.py", "rank_agreement"): "results of a rank statistic computed with numpy on the CPU",
    ("metrics/sanity.py", "randomization_check"): "a result from Python numbers, returned on the CPU",
    ("segmentation/shapley.py", "table"): "coalition codes from Python numbers, returned on the CPU",
    ("segmentation/shapley.py", "shapley_result"): "a result from Python numbers, returned on the CPU",
}


def factory_calls_without_device(text: str):
    """``(line, factory, enclosing function)`` of each factory call in ``text`` that names no device and is
    neither moved at once (``.to(...)``) nor a seeded draw (``generator=``)."""
    tree = ast.parse(text)
    parent = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        if any(k.arg in ("device", "generator") for k in node.keywords):
            continue
        up = parent.get(node)
        if isinstance(up, ast.Attribute) and up.attr == "to" and isinstance(parent.get(up), ast.Call):
            continue
        fn = up
        while fn is not None and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            fn = parent.get(fn)
        found.append((node.lineno, node.func.attr, fn.name if fn is not None else "<module>"))
    return found


def test_tensors_meeting_model_inputs_are_created_on_their_device():
    bad, used = [], set()
    for folder in AUDITED:
        for path in sorted((SRC / folder).rglob("*.py")):
            rel = path.relative_to(SRC).as_posix()
            for line, name, fn in factory_calls_without_device(path.read_text()):
                if (rel, fn) in HOST:
                    used.add((rel, fn))
                else:
                    bad.append(f"{rel}:{line} torch.{name} in {fn}()")
    assert not bad, "tensors created without device= (use device=x.device or *_like, or list the reason in HOST):\n" \
        + "\n".join(bad)
    assert used == set(HOST), f"HOST entries no longer needed: {sorted(set(HOST) - used)}"


def test_the_audit_finds_a_planted_cpu_tensor():
    planted = """
def method(model, x, target, cost):
    ok = torch.zeros(x.shape, device=x.device) + torch.ones_like(x) + torch.randn(3, generator=g).to(x)
    moved = torch.arange(4).to(x.device)
    return x * torch.ones(x.shape) + torch.tensor([1.0])
"""
    assert sorted((n, f) for _, n, f in factory_calls_without_device(planted)) == [("ones", "method"), ("tensor", "method")]
