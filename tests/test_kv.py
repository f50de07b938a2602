"KV-cache compression: exactness, equivalence with masked attention, GQA scores, real bytes, stacking and bad input, on tiny random decoders."
import math, pytest, torch, torch.nn.functional as F
from torch import nn
from workbench.core import WorkbenchError, stack
from workbench.kv import (KIVI, H2O, KVLayer, PyramidKV, RandomEvict, RecentOnly, SirLLM, SnapKV, StreamingLLM, ThinK, TOVA,
                          KiviStore, evicted_mask, kv_cache, attention_modules)
from workbench.ledger import cache_bytes
from workbench.models import tiny_lm, facts
from workbench.tasks import forward_cached

ARCHS = ['llama', 'qwen2', 'gemma3']
X = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))

def policies(**kw):
    return [StreamingLLM(**kw), RecentOnly(**kw), RandomEvict(**kw), H2O(**kw), SnapKV(window=4, **kw),
            SnapKV(window=4, query_aware=True, **kw), TOVA(**kw), SirLLM(**kw)]

@pytest.fixture(scope='module')
def tinies(): return {a: tiny_lm(a) for a in ARCHS}

@pytest.mark.parametrize('arch', ARCHS)
def test_no_eviction_is_exact(tinies, arch):
    t = tinies[arch]
    full, _, _ = forward_cached(t, X, chunk=8)
    for m in policies(ratio=0.0):
        with m.apply(t): got, _, _ = forward_cached(t, X, chunk=8)
        assert torch.allclose(got, full, atol=1e-5), m.name
    assert t.slots == {}

def _chunked(t, method, chunk=8, T=48):
    "Logits of chunked decoding through `method`'s cache and, per layer, the positions held before each chunk."
    cache, outs = kv_cache(t, None, method), []
    kept = [[[]] for _ in cache.layers]
    with method.apply(t), torch.no_grad():
        for s in range(0, T, chunk):
            outs.append(t.model(X[:, s:s+chunk], past_key_values=cache, use_cache=True).logits)
            for i, l in enumerate(cache.layers): kept[i].append(l.positions[0, 0].tolist())
    return torch.cat(outs, 1), kept

def _masked(t, masks):
    "One full-sequence forward where attention layer i uses `masks[i]`."
    def hook(mod, args, kw): kw['attention_mask'] = masks[mod.layer_idx]; return args, kw
    hs = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(t.model)]
    try:
        with torch.no_grad(): return t.model(X).logits
    finally:
        for h in hs: h.remove()

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_streaming_equals_masked_attention(tinies, arch):
    t = tinies[arch]
    got, kept = _chunked(t, StreamingLLM(ratio=0.5, sinks=2))
    want = _masked(t, [evicted_mask(k[:-1], 48, 8) for k in kept])
    assert torch.allclose(got, want, atol=1e-4)
    assert kept[0][-1] == [0, 1] + list(range(26, 48))

class PyramidStreaming(StreamingLLM):
    "StreamingLLM with a different budget per layer (tests that layers may hold different numbers of tokens)."
    def budget(self, layer, seen): return max(1, super().budget(layer, seen) - 3 * layer.index)

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_layers_holding_different_lengths_equal_masked_attention(tinies, arch):
    t = tinies[arch]
    got, kept = _chunked(t, PyramidStreaming(ratio=0.5, sinks=2))
    assert len({len(k[-1]) for k in kept}) == 4 # four layers, four sizes
    want = _masked(t, [evicted_mask(k[:-1], 48, 8) for k in kept])
    assert torch.allclose(got, want, atol=1e-4)

def test_snapkv_keeps_the_top_pooled_window_attention():
    "SnapKV keeps the top tokens by pooled window attention computed from eager attention weights (GQA: mean over a group's query heads)."
    t = tiny_lm('llama'); t.model.set_attn_implementation('eager')
    T, w, budget = 40, 4, 16
    with torch.no_grad(): att = t.model(X[:, :T], output_attentions=True).attentions # [1, 4 q heads, T, T] per layer
    m = SnapKV(tokens=budget, window=w, kernel=3, pooling='max')
    with m.apply(t): _, cache, _ = forward_cached(t, X[:, :T])
    for i, a in enumerate(att):
        votes = a[0, :, -w:].sum(1).view(2, 2, T).mean(1) # [kv heads, T]: query heads 0,1 -> kv head 0; 2,3 -> kv head 1
        pooled = F.max_pool1d(votes[:, None], 3, stride=1, padding=1)[:, 0]
        kept = torch.zeros(2, T, dtype=torch.bool).scatter_(1, cache.layers[i].positions[0].long(), True)
        assert kept[:, -w:].all() and kept.sum(1).tolist() == [budget, budget] # the window is kept
        for h in range(2): # every kept token outscores every evicted one (up to float ties: random weights tie often)
            assert pooled[h, :-w][kept[h, :-w]].min() >= pooled[h][~kept[h]].max() - 1e-6, (i, h)

def test_kivi_bytes_are_packed_and_exact():
    t = tiny_lm('llama') # 4 layers, 2 KV heads, head_dim 16
    with KIVI(bits=2, group=8, residual=8).apply(t): _, c, _ = forward_cached(t, X, chunk=8)
    # 48 tokens: 40 quantized (5 blocks of 8) + 8 residual. Per head: codes 16 ch x 2 bit = 4 B per token for K and V,
    # value (scale, zero) fp16 per 8 channels = 2 x 2 x 2 B per token, key (scale, zero) per channel per block
    per_head = 40 * (4 + 4 + 8) + 5 * 16 * 2 * 2 + 8 * 16 * 2 * 4
    assert cache_bytes(c) == 4 * 2 * per_head
    with KIVI(bits=8, group=8, residual=0).apply(t): q8, _, _ = forward_cached(t, X, chunk=8)
    full, _, _ = forward_cached(t, X, chunk=8)
    assert (q8 - full).abs().max() < 0.05

def test_kivi_store_eviction_keeps_codes_valid():
    K, V = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    for keys in ('channel', 'token'):
        st = KiviStore(2, 8, 8, keys); st.append(K, V)
        k0, v0 = st.read(); n, r = len(st), st.tail()
        idx = torch.stack([torch.cat([torch.randperm(n - r)[:30].sort().values, torch.arange(n - r, n)]) for _ in range(2)])[None]
        st.select(idx); k1, v1 = st.read()
        assert torch.equal(k1, k0.gather(2, idx[..., None].expand(-1, -1, -1, 16)))
        assert torch.equal(v1, v0.gather(2, idx[..., None].expand(-1, -1, -1, 16)))

@pytest.mark.parametrize('arch', ARCHS)
def test_every_method_shrinks_the_full_attention_layers(tinies, arch):
    t = tinies[arch]; kvh = facts(t)['kv_heads']
    ms = policies(ratio=0.75) + [PyramidKV(ratio=0.75, window=4), KIVI(bits=2, group=8, residual=8), ThinK(prune=0.5, window=4),
                                  stack(SnapKV(ratio=0.5, window=4), KIVI(bits=4, group=8, residual=8))]
    for m in ms:
        with m.apply(t): _, c, peak = forward_cached(t, X, chunk=8)
        ours = [l for l in c.layers if isinstance(l, KVLayer)]
        assert sum(cache_bytes(l) for l in ours) < len(ours) * 48 * 2 * kvh * 16 * 4, m.name
    if arch == 'gemma3': assert [type(l).__name__ for l in c.layers] == ['DynamicSlidingWindowLayer'] * 3 + ['KVLayer']

def test_think_stores_fewer_channels():
    t = tiny_lm('qwen2')
    with ThinK(prune=0.5, window=4).apply(t): _, c, _ = forward_cached(t, X)
    st = c.layers[0].store
    assert st.kp.shape == (1, 2, 44, 8) and st.rk.shape == (1, 2, 4, 16) and st.channels.dtype == torch.int16

def test_stack_evict_and_store_restores(tinies):
    t = tinies['llama']
    with stack(H2O(ratio=0.5), KIVI(bits=4, group=8, residual=8)).apply(t):
        _, c, _ = forward_cached(t, X, chunk=8)
        assert isinstance(c.layers[0].store, KiviStore) and c.layers[0].policy.name.startswith('H2O')
    assert t.slots == {}
    with stack(KIVI(bits=4, group=8, residual=8), SnapKV(ratio=0.5, window=4)).apply(t): # either order
        _, c, _ = forward_cached(t, X, chunk=8)
        assert isinstance(c.layers[0].store, KiviStore) and isinstance(c.layers[0].policy, SnapKV)

def test_bad_input(tinies):
    t = tinies['llama']
    with pytest.raises(WorkbenchError, match='valid: 2, 4, 8'): KIVI(bits=3)
    with pytest.raises(WorkbenchError, match='keeps no tokens'): H2O(ratio=1.0)
    with pytest.raises(WorkbenchError, match='out of range'): SnapKV(tokens=-1)
    with pytest.raises(WorkbenchError, match='out of range'): SnapKV(ratio=-0.5)
    with pytest.raises(WorkbenchError, match='cannot hold'): StreamingLLM(tokens=2, sinks=4)
    with pytest.raises(WorkbenchError, match='must divide head_dim=16'): KIVI(group=32).install(t)
    with pytest.raises(WorkbenchError, match='already taken'): stack(SnapKV(), TOVA()).install(t)
    with pytest.raises(WorkbenchError, match='already taken'): stack(KIVI(group=8), ThinK()).install(t)
    assert t.slots == {}
    with SnapKV(tokens=100, window=4).apply(t): # prefill 48 tokens < budget 100, then decode: refused
        cache = kv_cache(t, None, t.slots['cache'][0])
        with torch.no_grad(), pytest.raises(WorkbenchError, match='nothing would be compressed'):
            t.model(X, past_key_values=cache, use_cache=True); t.model(X[:, :1], past_key_values=cache, use_cache=True)
    broken = tiny_lm('llama'); broken.model.model.layers[1].self_attn.q_proj = None # as in a model with fused QKV
    with pytest.raises(WorkbenchError, match='needs attention scores'): H2O().install(broken)
    assert broken.slots == {}
    with pytest.raises(WorkbenchError, match="kind 'encoder'"): KIVI().install(tiny_lm('bert'))

def test_theory(tinies):
    t = tinies['llama']; base = {'weights': 1, 'kv': 1000}
    assert SnapKV(ratio=0.75).theory(t, base)['kv'] == 250
    assert SnapKV(ratio=0.75, query_aware=True).theory(t, base)['kv'] == 250 # the budget; holding the prompt until the question shows in the measured peak
    assert KIVI(bits=4, group=8).theory(t, base)['kv'] == round(1000 * (0.5 + 4 / 8) / 4)

@pytest.mark.slow
def test_smollm2_claims_quick():
    "On SmolLM2 (256 tokens, 32-token chunks): sinks matter, heavy hitters beat recent-only, per-channel keys beat per-token."
    from workbench.models import load
    from workbench.tasks import Perplexity
    lm = load('smollm2-135m'); task = Perplexity(tokens=256, window=256, chunk=32); ref = task.reference(lm)
    def run(m):
        with m.apply(lm): return task.run(lm, ref)
    assert run(StreamingLLM(ratio=0.5, sinks=4))['ppl'] < 0.5 * run(StreamingLLM(ratio=0.5, sinks=0))['ppl']
    assert run(H2O(ratio=0.5))['ppl'] < run(RecentOnly(ratio=0.5))['ppl']
    assert run(KIVI(bits=2, residual=32))['kl'] < run(KIVI(bits=2, residual=32, keys='token'))['kl']
