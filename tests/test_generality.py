"Facts, the ledger and the reference methods on tiny random configs of other architectures."
import pytest, torch
from transformers import DynamicCache
from workbench.core import stack
from workbench.ledger import cache_bytes, kv_bytes_theory, unique_tensors, weight_bytes
from workbench.methods import HalfKV, HalfWeights, LocalWindow, new_cache
from workbench.models import facts, tiny_lm

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3', 'bert'])
def test_facts_and_weight_bytes(arch):
    lm = tiny_lm(arch); f = facts(lm)
    assert f['layers'] == 4 and f['q_heads'] == 4 and f['head_dim'] == 16
    assert f['kv_heads'] == {'llama': 2, 'qwen2': 2, 'gemma3': 1, 'bert': 4}[arch]
    assert weight_bytes(lm.model) == 4 * sum(p.numel() for p in unique_tensors(lm.model.parameters()))

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_reference_methods_stack_and_restore(arch):
    lm = tiny_lm(arch); x = torch.randint(0, 500, (1, 32))
    with torch.no_grad(): base = lm.model(x).logits
    w0 = weight_bytes(lm.model)
    with stack(HalfWeights(), HalfKV(), LocalWindow(window=8)).apply(lm), torch.no_grad():
        out = lm.model(x, past_key_values=new_cache(lm), use_cache=True)
        assert cache_bytes(out.past_key_values) == kv_bytes_theory(lm.model, 32) // 2
        assert weight_bytes(lm.model) < w0
    with torch.no_grad(): assert torch.equal(lm.model(x).logits, base)
    assert lm.slots == {} and weight_bytes(lm.model) == w0

def test_gemma3_sliding_cache_counted_from_storage():
    lm = tiny_lm('gemma3')
    with torch.no_grad():
        c = lm.model(torch.randint(0, 500, (1, 40)), past_key_values=DynamicCache(config=lm.model.config), use_cache=True).past_key_values
        c = lm.model(torch.randint(0, 500, (1, 1)), past_key_values=c, use_cache=True).past_key_values
    per_token = 2 * 1 * 16 * 4
    assert cache_bytes(c) == (3 * 16 + 41) * per_token + 3 * 8
