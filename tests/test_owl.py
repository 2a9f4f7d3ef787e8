"""OWL: outlier ratios, the LOD -> sparsity map (mean exactly the target, within +-lambda, direction),
the dense statistics pass on a tiny model (inputs and weights untouched, LOD against hooks), end to end."""
import math

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from layerwise.owl import outlier_ratio, owl_sparsities
from oats.interface import Allocation
from oats.experiment import block_sparsities
from oats.weights import InMemoryWeights
from eval.report import plot_owl, plot_owl_record
from oats.config import ConfigError, resolve
from oats.architectures import get_blocks, linear_layers
from oats.pipeline import capture_inputs
from tests.conftest import tiny_model


def reference_owl(lod, target, lam):
    """Transcription of luuyin/OWL prune_wanda_outlier: min-max to [0, 2 lambda], mean-shift to the density 1 - target."""
    r = np.array(lod, dtype=np.float64)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - target)
    return [1 - x for x in r]


def test_outlier_ratio_brute_force():
    torch.manual_seed(0)
    a, b = torch.rand(5, 7) ** 4, torch.rand(3, 11) ** 4
    vals = a.flatten().tolist() + b.flatten().tolist()
    mean = sum(vals) / len(vals)
    for m in (1.0, 2.0, 3.5):
        assert outlier_ratio([a, b], m) == pytest.approx(sum(v > m * mean for v in vals) / len(vals), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target, lam", [(0.5, 0.08), (0.7, 0.08), (0.5, 0.2), (0.3, 0.02)])
def test_ratios_mean_exactly_target_and_within_lambda(seed, target, lam):
    g = torch.Generator().manual_seed(seed)
    lod = (torch.rand(30, generator=g) ** 3 * 0.05).tolist()  # skewed, like real LODs
    s = owl_sparsities(lod, target, lam)
    assert len(s) == 30
    assert abs(math.fsum(s) / 30 - target) < 1e-12
    assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in s)
    assert max(abs(v - target) for v in s) == pytest.approx(lam, abs=1e-12)  # the band is used fully
    order = sorted(range(30), key=lambda i: lod[i])  # more outliers -> lower sparsity
    assert all(s[order[k]] >= s[order[k + 1]] - 1e-15 for k in range(29))


def test_hand_examples():
    t, lam = 0.5, 0.1
    assert owl_sparsities([0.0, 1.0, 2.0], t, lam) == pytest.approx([0.6, 0.5, 0.4], abs=1e-15)
    # skewed: the reference puts the outlier block 1.5 lambda below the target; we shrink to lambda
    assert owl_sparsities([0, 0, 0, 3], t, lam, bounded=False) == pytest.approx([0.55, 0.55, 0.55, 0.35], abs=1e-15)
    assert owl_sparsities([0, 0, 0, 3], t, lam) == pytest.approx([0.5 + 0.1 / 3] * 3 + [0.4], abs=1e-15)
    assert owl_sparsities([0.02] * 4, t, lam) == [t] * 4  # no signal -> uniform


@pytest.mark.parametrize("seed", range(3))
def test_unbounded_is_the_reference_and_bounded_agrees_when_it_fits(seed):
    g = torch.Generator().manual_seed(seed)
    lod = torch.rand(12, generator=g).tolist()
    assert owl_sparsities(lod, 0.6, 0.08, bounded=False) == pytest.approx(reference_owl(lod, 0.6, 0.08), abs=1e-12)
    sym = [0.0, 1.0] * 6  # mean at the midpoint: the reference stays within +-lambda
    assert owl_sparsities(sym, 0.6, 0.08) == pytest.approx(reference_owl(sym, 0.6, 0.08), abs=1e-12)


def _cfg(**kw):
    base = dict(model="tiny", method="wanda", sparsity=0.5, layerwise="owl", owl_m=3.0, owl_lambda=0.1)
    return resolve(ConfigDict({**base, **kw}))


def test_statistics_pass_leaves_inputs_and_weights_and_matches_hooks():
    model = tiny_model("llama", layers=4, seed=1)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (6, 32))
    inputs = capture_inputs(model, ids, torch.device("cpu"), batch_size=3)
    hidden0 = [h.clone() for h in inputs.hidden]
    weights0 = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg()
    allocation = block_sparsities(InMemoryWeights(model), inputs, cfg, torch.device("cpu"))
    assert isinstance(allocation, Allocation) and len(allocation.sparsities) == 4
    s, info = allocation.sparsities, allocation.info
    assert all(torch.equal(a, b) for a, b in zip(hidden0, inputs.hidden))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights0.items())
    assert abs(sum(s) / 4 - 0.5) < 1e-12
    # block 0's LOD recomputed independently: capture each linear's inputs with plain hooks
    block = get_blocks(model)[0]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [lin.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
             for n, lin in linear_layers(block).items()]
    with torch.no_grad():
        for h in hidden0:
            block(h, **inputs.kwargs_for(h))
    for hk in hooks:
        hk.remove()
    scores = []
    for n, lin in linear_layers(block).items():
        X = torch.cat(seen[n]).double()
        scores.append((lin.weight.double().abs() * X.norm(dim=0)[None, :]).flatten())
    allv = torch.cat(scores)
    ref = float((allv > 3.0 * allv.mean()).double().mean())
    assert info["lod"][0] == pytest.approx(ref, abs=1e-9)
    assert len(set(info["lod"])) > 1  # the tiny model gives signal, so the allocation is not trivial
    assert s == pytest.approx(owl_sparsities(info["lod"], 0.5, 0.1), abs=1e-15)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_end_to_end_blocks_get_their_sparsity(method):
    from oats.compressor import compress_model

    model = tiny_model("llama", layers=3, seed=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs = capture_inputs(model, ids, torch.device("cpu"), batch_size=2)
    cfg = _cfg(method=method, mask_scope="layer")
    s = block_sparsities(InMemoryWeights(model), inputs, cfg, torch.device("cpu")).sparsities
    recs = compress_model(model, inputs, cfg, torch.device("cpu"), s)
    for r in recs:
        n = r["shape"][0] * r["shape"][1]
        assert r["kept_params"] == n - int(n * s[r["block"]])


def test_config_validation():
    assert _cfg(method="sparsegpt").layerwise == "owl"
    with pytest.raises(ConfigError, match="sparsity_type"):
        _cfg(sparsity_type="2:4")
    with pytest.raises(ConfigError, match="owl_lambda"):
        _cfg(sparsity=0.95, owl_lambda=0.08)


def test_plot(tmp_path):
    p = plot_owl([0.01, 0.03, 0.02], [0.55, 0.45, 0.5], 0.5, tmp_path / "owl.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="per block"):
        plot_owl([0.01], [0.5, 0.5], 0.5, tmp_path / "bad.png")
    rec = {"name": "x", "config": {"sparsity": 0.5}, "block_sparsity": [0.55, 0.45], "layerwise": {"name": "owl", "lod": [0.01, 0.03]}}
    assert plot_owl_record(rec, tmp_path / "r.png").is_file()
    assert plot_owl_record({"config": {"sparsity": 0.5}, "block_sparsity": [0.5]}, tmp_path / "n.png") is None
