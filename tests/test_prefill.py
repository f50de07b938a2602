"DuoAttention on tiny configs (no tokenizer, so the conformance test skips its calibrated default): the depth control."
import pytest, torch
from workbench.methods import new_cache
from workbench.models import tiny_lm
from workbench.sparse.prefill import DuoAttention, SinkLocal

def logits(lm, x):
    with torch.no_grad(): return lm.model(x, past_key_values=new_cache(lm), use_cache=True).logits

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_duo_depth_runs_and_restores(arch, dtype):
    lm, x = tiny_lm(arch, hidden=256, heads=4, kv_heads=2, dtype=dtype), torch.randint(0, 500, (1, 160))
    before = logits(lm, x)
    duo = DuoAttention(retrieval=0.5, window=16, block=32, ranking='depth')
    with duo.apply(lm): got = logits(lm, x)
    assert got.dtype == before.dtype and torch.isfinite(got).all() and not torch.equal(got, before)
    assert duo.full.float().mean() == 0.5 and 0 < duo.computed_fraction < 1
    assert torch.equal(logits(lm, x), before)

def test_duo_extremes_are_dense_and_sink_local():
    lm, x = tiny_lm('llama', hidden=256, heads=4, kv_heads=2), torch.randint(0, 500, (1, 160))
    with DuoAttention(retrieval=1.0).apply(lm): full = logits(lm, x)
    torch.testing.assert_close(full, logits(lm, x), atol=1e-4, rtol=0)
    with DuoAttention(retrieval=0.0, window=16, block=32).apply(lm): none = logits(lm, x)
    with SinkLocal(window=16, block=32).apply(lm): local = logits(lm, x)
    torch.testing.assert_close(none, local, atol=1e-5, rtol=0)
