"Locret's conformance with seeded untrained heads (the registry's default, trained heads, exists for SmolLM2 only)."
import pytest, torch
from workbench.ledger import cache_bytes, weight_bytes
from workbench.methods import new_cache
from workbench.models import tiny_lm
from workbench.kv.locret import Locret

def prefill_and_step(lm, x):
    "A prompt, then one decoding step: logits and the cache."
    out = lm.model(x, past_key_values=new_cache(lm), use_cache=True)
    return out.logits, lm.model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True).past_key_values

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3'])
def test_untrained_heads_conform(arch, dtype):
    "Untrained heads: the cache shrinks, the heads are on the weights' ledger, the model is restored bit for bit."
    lm, x = tiny_lm(arch, hidden=256, heads=4, kv_heads=2, dtype=dtype), torch.randint(0, 500, (1, 160))
    with torch.no_grad(): before, cache = prefill_and_step(lm, x)
    full_cache, full_weights = cache_bytes(cache), weight_bytes(lm.model)
    params = {k: v.clone() for k, v in lm.model.state_dict().items()}
    method = Locret(heads='untrained')
    with method.apply(lm):
        with torch.no_grad(): logits, cache = prefill_and_step(lm, x)
        assert logits.dtype == getattr(torch, dtype) and torch.isfinite(logits).all()
        assert cache_bytes(cache) < full_cache
        assert weight_bytes(lm.model) == method.theory(lm, dict(weights=full_weights, kv=1))['weights'] > full_weights
    assert lm.model.state_dict().keys() == params.keys()
    assert all(torch.equal(v, params[k]) for k, v in lm.model.state_dict().items())
    with torch.no_grad(): assert torch.equal(prefill_and_step(lm, x)[0], before)
