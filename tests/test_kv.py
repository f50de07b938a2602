"""KV-cache compression on tiny random decoders: exactness, equivalence with masked attention, GQA scores, real bytes,
the store and policy contracts, stacking and bad input."""
import math, pytest, torch, torch.nn.functional as F
from torch import nn
from workbench.core import WorkbenchError, stack
from workbench.kv.methods import (KIVI, H2O, KVLayer, PyramidKV, pyramid_budgets, RandomEvict, Knorm, RecentOnly,
                                  SirLLM, SnapKV, StreamingLLM, ThinK, TOVA, Store, FullStore, KiviStore, ThinKStore,
                                  evicted_mask, kv_cache, attention_modules)
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
    "StreamingLLM with a different budget per layer from the budget hook (layers may hold different numbers of tokens)."
    def allocate(self, seen, layers): return [max(1, self.budget(None, seen) - 3 * i) for i in range(layers)]

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_layers_holding_different_lengths_equal_masked_attention(tinies, arch):
    t = tinies[arch]
    got, kept = _chunked(t, PyramidStreaming(ratio=0.5, sinks=2))
    assert len({len(k[-1]) for k in kept}) == 4 # four layers, four sizes
    want = _masked(t, [evicted_mask(k[:-1], 48, 8) for k in kept])
    assert torch.allclose(got, want, atol=1e-4)

def test_allocation_is_the_budget_of_layout_and_theory(tinies):
    "`allocate` is the one per-layer budget hook: `layout` hands each layer its share and `theory` sums the same."
    t, m = tinies['llama'], PyramidStreaming(ratio=0.5, sinks=2)
    layers = [KVLayer(FullStore(), m, index=i, n_layers=4) for i in range(4)]
    assert [m.layout(l, 48) for l in layers] == [(24, 0), (21, 0), (18, 0), (15, 0)]
    base = {'kv': 48 * 4 * 2 * 2 * 16 * 4} # 48 tokens, 4 layers, 2 KV heads of 16 channels, fp32
    assert m.theory(t, base)['kv'] == round(base['kv'] * (24 + 21 + 18 + 15) / (4 * 48))
    uniform = [StreamingLLM, RecentOnly, RandomEvict, H2O, SnapKV, TOVA, SirLLM, Knorm]
    assert all(P(ratio=0.5).allocate(48, 4) is None for P in uniform) # None: the same budget in every layer
    assert PyramidKV(ratio=0.75, window=4).allocate(48, 4) == pyramid_budgets(12, 4, 48, 4)

def test_every_policy_has_sinks_and_window():
    "Every eviction policy takes `sinks` and `window`; defaults keep each policy's behaviour; RecentOnly refuses sinks."
    defaults = {P.__name__: (P().sinks, P().window) for P in (StreamingLLM, RecentOnly, RandomEvict, H2O, SnapKV, TOVA,
                                                               SirLLM, PyramidKV, Knorm)}
    assert defaults == dict(StreamingLLM=(4, 0), RecentOnly=(0, 0), RandomEvict=(0, 0), H2O=(0, 0), SnapKV=(0, 32),
                            TOVA=(0, 0), SirLLM=(4, 0), PyramidKV=(0, 32), Knorm=(0, 0))
    layer = KVLayer(FullStore(), index=0, n_layers=1)
    assert H2O(ratio=0.5).layout(layer, 100) == (50, 25) # `recent`, a fraction of the budget
    assert H2O(ratio=0.5, recent=0.1, window=20).layout(layer, 100) == (50, 20) # the larger of fraction and window
    assert SirLLM(ratio=0.5, window=40).layout(layer, 100) == (50, 25) # the window takes at most half the budget
    with pytest.raises(WorkbenchError, match='StreamingLLM keeps sinks'): RecentOnly(sinks=4)

def test_stores_declare_the_contract():
    "Stores subclass `Store`; one leaving a method out cannot be built; `needs_queries` is declared, False by default."
    assert all(issubclass(S, Store) for S in (FullStore, KiviStore, ThinKStore))
    assert (FullStore.needs_queries, KiviStore.needs_queries, ThinKStore.needs_queries) == (False, False, True)
    class NoSelect(Store):
        def __len__(self): return 0
        def read(self): return None, None
        def append(self, k, v, out_k, out_v, layer): pass
    with pytest.raises(TypeError, match='select'): NoSelect()
    assert KVLayer(FullStore(), H2O()).wants_queries and not KVLayer(FullStore(), StreamingLLM()).wants_queries
    assert KVLayer(ThinKStore()).wants_queries

def test_snapkv_keeps_the_top_pooled_window_attention():
    "SnapKV keeps the top tokens by pooled window attention from eager attention weights (GQA: a group's mean)."
    t = tiny_lm('llama'); t.model.set_attn_implementation('eager')
    T, w, budget = 40, 4, 16
    with torch.no_grad(): att = t.model(X[:, :T], output_attentions=True).attentions # [1, 4 q heads, T, T] per layer
    m = SnapKV(tokens=budget, window=w, kernel=3, pooling='max')
    with m.apply(t): _, cache, _ = forward_cached(t, X[:, :T])
    for i, a in enumerate(att):
        # [kv heads, T]: query heads 0, 1 -> kv head 0; 2, 3 -> kv head 1
        votes = a[0, :, -w:].sum(1).view(2, 2, T).mean(1)
        pooled = F.max_pool1d(votes[:, None, :-w], 3, stride=1, padding=1)[:, 0] # the tokens before the window only
        kept = torch.zeros(2, T, dtype=torch.bool).scatter_(1, cache.layers[i].positions[0].long(), True)
        assert kept[:, -w:].all() and kept.sum(1).tolist() == [budget, budget] # the window is kept
        for h in range(2): # every kept token outscores every evicted one (up to float ties: random weights tie often)
            assert pooled[h][kept[h, :-w]].min() >= pooled[h][~kept[h, :-w]].max() - 1e-6, (i, h)

def reference_pyramid(max_capacity_prompt, window_size, q_len, num_hidden_layers, layer_idx, beta=20):
    "Tokens layer `layer_idx` keeps in PyramidKVCluster.update_kv (KVCache-Factory's pyramidkv/pyramidkv_utils.py)."
    min_num = (max_capacity_prompt - window_size) // beta
    max_num = (max_capacity_prompt - window_size) * 2 - min_num
    if max_num >= q_len - window_size:
        max_num = q_len - window_size
        min_num = (max_capacity_prompt - window_size) * 2 - max_num
    steps = (max_num - min_num) // (num_hidden_layers - 1)
    capacity = max_num - layer_idx * steps
    if q_len < max_capacity_prompt: return q_len # kept whole
    if q_len < (max_capacity_prompt - window_size) * 2: return max_capacity_prompt - window_size + window_size
    return capacity + window_size # top-`capacity` scored tokens plus the window

@pytest.mark.parametrize('seen', [512, 2048, 300])
def test_pyramidkv_schedule_is_the_authors(seen):
    "PyramidKV's per-layer budgets on 30 layers at 50/75/90% equal PyramidKVCluster's arithmetic (integer steps too)."
    class L: pass
    t30 = tiny_lm('llama', layers=30)
    for ratio in (0.5, 0.75, 0.9, 0.25, 0.45): # 0.25: uniform branch; 0.45 at 512: the bottom capped at the tokens seen
        m, b = PyramidKV(ratio=ratio, window=32), math.ceil((1 - ratio) * seen)
        got = []
        for i in range(30):
            l = L(); l.index, l.n_layers = i, 30
            got.append(m.layout(l, seen))
        if b <= 32: # the authors' code asserts budget > window; we fall back to SnapKV's uniform budget
            assert got == [(b, min(32, b // 2))] * 30; continue
        want = [reference_pyramid(b, 32, seen, 30, i) for i in range(30)]
        assert [g[0] for g in got] == want, (ratio, seen)
        assert all(g[1] == 32 for g in got) # the whole observation window in every layer
        base = {'kv': seen * 30 * 2 * 16 * 2 * 4} # 30 layers, 2 KV heads of 16 channels, K and V in fp32
        assert m.theory(t30, base)['kv'] == round(base['kv'] * sum(want) / (30 * seen)) # the sum of the actual budgets
    assert reference_pyramid(52, 32, 512, 30, 29) == 42 # 90% of 512 tokens: the top layer keeps 10 scored + the window
    capped = pyramid_budgets(282, 32, 512, 30)
    assert capped[0] == 512 and sum(capped) >= 30 * 282 # the bottom capped at what it saw, the rest redistributed

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
        keep = lambda: torch.cat([torch.randperm(n - r)[:30].sort().values, torch.arange(n - r, n)])
        idx = torch.stack([keep() for _ in range(2)])[None]
        st.select(idx); k1, v1 = st.read()
        assert torch.equal(k1, k0.gather(2, idx[..., None].expand(-1, -1, -1, 16)))
        assert torch.equal(v1, v0.gather(2, idx[..., None].expand(-1, -1, -1, 16)))

@pytest.mark.parametrize('arch', ARCHS)
def test_every_method_shrinks_the_full_attention_layers(tinies, arch):
    t = tinies[arch]; kvh = facts(t)['kv_heads']
    ms = policies(ratio=0.75) + [PyramidKV(ratio=0.75, window=4), KIVI(bits=2, group=8, residual=8),
                                  ThinK(prune=0.5, window=4),
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
    # the budget; holding the prompt until the question shows in the measured peak
    assert SnapKV(ratio=0.75, query_aware=True).theory(t, base)['kv'] == 250
    assert KIVI(bits=4, group=8).theory(t, base)['kv'] == round(1000 * (0.5 + 4 / 8) / 4)

@pytest.mark.slow
def test_smollm2_claims_quick():
    "KIVI's dequantized K/V equal transformers' QuantizedCache (quanto) where settings coincide (axes -1 and 0)."
    from workbench.models import load
    from workbench.tasks import Perplexity
    lm = load('smollm2-135m'); task = Perplexity(tokens=256, window=256, chunk=32); ref = task.reference(lm)
    def run(m):
        with m.apply(lm): return task.run(lm, ref)
    assert run(StreamingLLM(ratio=0.5, sinks=4))['ppl'] < 0.5 * run(StreamingLLM(ratio=0.5, sinks=0))['ppl']
    assert run(H2O(ratio=0.5))['ppl'] < run(RecentOnly(ratio=0.5))['ppl']
    assert run(KIVI(bits=2, residual=32))['kl'] < run(KIVI(bits=2, residual=32, keys='token'))['kl']

@pytest.mark.parametrize('bits', [2, 4])
@pytest.mark.parametrize('group', [8, 16])
def test_kivi_equals_transformers_quanto_cache(bits, group):
    "KIVI's dequantized K/V equal transformers' QuantizedCache (quanto) where the settings coincide (axes -1 and 0)."
    pytest.importorskip('optimum.quanto')
    from transformers.cache_utils import QuantoQuantizedLayer
    from workbench.packing import unpack
    t = tiny_lm('llama') # head_dim 16
    _, full, _ = forward_cached(t, X) # 48 tokens: a multiple of the group
    for l in full.layers:
        q = QuantoQuantizedLayer(nbits=bits, axis_key=-1, axis_value=0, q_group_size=group, residual_length=128)
        q.update(l.keys, l.values)
        want = q._dequantize(q._quantized_keys), q._dequantize(q._quantized_values)
        exact = KiviStore(bits, group, residual=0, keys='channel', scale_dtype=torch.float32)
        exact.append(l.keys, l.values)
        for got, w in zip(exact.read(), want): assert (got - w).abs().max().item() <= 1e-6 # fp32 scales: same numbers
        kivi = KiviStore(bits, group, residual=0, keys='channel'); kivi.append(l.keys, l.values) # fp16 scales and zeros
        moved = sum((unpack(a, bits) != unpack(b, bits)).float().mean().item()
                    for a, b in ((kivi.kq, exact.kq), (kivi.vq, exact.vq))) / 2
        assert moved < 0.02 # only codes at a rounding boundary move
        for got, w, x in zip(kivi.read(), want, (l.keys, l.values)):
            assert abs((got - x).norm() / (w - x).norm() - 1) < 0.02 # the same reconstruction error
    q = QuantoQuantizedLayer(nbits=bits, q_group_size=group) # default axis_key=0: keys per token, KIVI's keys='token'
    q.update(full.layers[0].keys, full.layers[0].values)
    st = KiviStore(bits, group, residual=0, keys='token', scale_dtype=torch.float32)
    st.append(full.layers[0].keys, full.layers[0].values)
    assert torch.equal(st.read()[0], q._dequantize(q._quantized_keys))
