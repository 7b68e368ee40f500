"""Batching where the peers batch (issue 26): the perturbation methods fill each model call with up to
``chunk_size`` rows across the samples of the batch and their perturbations, and the maps equal those of
one sample at a time. Model calls are counted by a forward hook on the user's model."""
import pytest
import torch

import medexplain as mx
from conftest import image, make, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

#: method -> (options, rows of perturbations per sample for the tiny 2D classifier on 12 x 12 inputs,
#: a chunk_size for which one sample at a time would make fewer full calls: 3 * (rows // chunk) < 3 rows // chunk)
CASES = {
    "occlusion": ({"window": 4, "stride": 4}, 9, 5),              # 3 x 3 windows
    "scorecam": ({"layer": "features.2"}, 6, 4),                  # one masked input per channel
    "ablationcam": ({"layer": "features.2"}, 6, 4),               # one ablation per channel
    "kernelshap": ({"features": "grid", "n_features": 4, "n_samples": 10, "seed": 1}, 10, 4),
    "lime": ({"features": "grid", "n_features": 4, "n_samples": 10, "seed": 1}, 10, 4),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_model_calls_are_filled_across_samples_and_maps_equal_one_sample_at_a_time(method):
    opts, per_sample, chunk = CASES[method]
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        attr = mx.explain(model, x, method, target=t, chunk_size=chunk, **opts)
        batched = list(calls)
        alone = torch.cat([mx.explain(model, x[i:i + 1], method, target=t[i], chunk_size=chunk, **opts).map
                           for i in range(3)])
    finally:
        handle.remove()
    total = 3 * per_sample
    # the perturbed rows of all samples fill full calls (the other calls, the plain forward of the batch
    # and the memory probe, have fewer rows than chunk_size); one sample at a time would fill fewer
    assert batched.count(chunk) == total // chunk > 3 * (per_sample // chunk), batched
    assert max(batched) == chunk
    assert attr.map.abs().max() > 0 or method == "lime"   # LIME's Lasso may zero a tiny model's effects
    assert rel_err(attr.map, alone) <= 1e-12
