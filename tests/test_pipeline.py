"""The streaming plumbing: block-by-block forward equals the model's own, statistics are right, and each
block is calibrated on the outputs of the *compressed* previous block."""
import pytest
import torch

from oats.architectures import get_blocks, linear_layers
from oats.pipeline import StatsCollector, capture_inputs, run_block, stream, streamed_logits
from tests.conftest import tiny_model

CPU = torch.device("cpu")


def test_streamed_forward_matches_model_smollm2(smollm2):
    model, tok = smollm2
    ids = tok(["The quick brown fox jumps over the lazy dog. " * 6, "def f(x):\n    return x * 2\n" * 5],
              return_tensors="pt", padding="max_length", max_length=64, truncation=True).input_ids
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got = streamed_logits(model, ids, CPU, batch_size=1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt"])
def test_streamed_forward_matches_model_architectures(arch):
    model = tiny_model(arch, layers=3)
    ids = torch.randint(4, 128, (3, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got = streamed_logits(model, ids, CPU, batch_size=2)
    assert (got - ref).abs().max() < 1e-5


def test_stats_collector_diag_gram_and_sharing():
    model = tiny_model("llama", layers=1)
    block = get_blocks(model)[0]
    inputs = capture_inputs(model, torch.randint(4, 128, (4, 16)), CPU, batch_size=2)
    layers = linear_layers(block)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1]))) for n, m in layers.items()]
    with StatsCollector(layers, "gram", torch.float64) as col:
        for h in inputs.hidden:
            run_block(block, h, inputs.kwargs_for(h))
            col.end_batch()
    for hk in hooks:
        hk.remove()
    assert col.owner["self_attn.k_proj"] == col.owner["self_attn.v_proj"] == "self_attn.q_proj"
    assert col.owner["mlp.up_proj"] == "mlp.gate_proj"
    for n in layers:
        x = torch.cat(seen[n]).double()
        st = col.stats(n)
        assert st.n_tokens == 64
        torch.testing.assert_close(st.gram, x.T @ x)
        torch.testing.assert_close(st.sq_norms, (x * x).sum(0))


def test_next_block_calibrated_on_compressed_outputs():
    model = tiny_model("llama", layers=3)
    ids = torch.randint(4, 128, (2, 16))
    inputs = capture_inputs(model, ids, CPU, batch_size=1)
    blocks = get_blocks(model)
    captured = {}

    def zero_half(i, block, layers, collector, inputs):
        for lin in layers.values():
            lin.weight.data[:, ::2] = 0  # "compress"

    def record_first_input(i):
        def hook(mod, args, kwargs):
            captured.setdefault(i, args[0])  # the first call of block i is its statistics pass

        return hook

    hooks = [b.register_forward_pre_hook(record_first_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
    out = stream(model, inputs, CPU, "diag", zero_half)
    for h in hooks:
        h.remove()
    # Reference: run the already-compressed blocks in sequence on block 0's inputs.
    h = inputs.hidden[0]
    for i, b in enumerate(blocks):
        assert torch.equal(captured[i], h), f"block {i} was not fed the compressed block {i - 1}'s output"
        h = run_block(b, h, inputs.kwargs_for(h))
    torch.testing.assert_close(out.hidden[0], h)
    # And it differs from the dense model's path, so the check has teeth.
    dense = tiny_model("llama", layers=3)
    hd = inputs.hidden[0]
    for b in get_blocks(dense)[:2]:
        hd = run_block(b, hd, inputs.kwargs_for(hd))
    assert not torch.allclose(captured[2], hd)


def test_capture_inputs_keeps_block0_intact():
    model = tiny_model("qwen2", layers=2)
    b0 = get_blocks(model)[0]
    capture_inputs(model, torch.randint(4, 128, (2, 8)), CPU, 1)
    assert get_blocks(model)[0] is b0
