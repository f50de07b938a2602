"Sparse attention: every mask against the masked-SDPA definition (random inputs, SmolLM2, GQA), both backends, chunked prefill, Quest's schedule and page choice against a direct computation, counters, decoding tasks, other architectures, bytes and bad input."
import pytest, torch
from workbench.core import WorkbenchError
from workbench.models import tiny_lm, load
from workbench.ledger import kv_bytes_theory
from workbench.sparse.methods import (Window, SinkWindow, Strided, BlockSparse, TopK, SparseWindow, DynamicBlockSparse,
                                      Quest, RecordQKV, sparse_patterns, max_error, method_mask,
                                      reference_attention, droppable_kv, as_eviction, causal, topk_mask, decode_mask)
from workbench.sparse.study import AttentionCounts, DecodePerplexity, DecodeNeedle, study_grid, bench_grid
from workbench.tasks import forward_cached, Perplexity

torch.set_num_threads(1)

def methods():
    return [Window(window=50), SinkWindow(sinks=4, window=40), Strided(window=16, stride=7), BlockSparse(block=32, local=2, globals=1),
            TopK(k=24), SparseWindow(k=16, window=16), DynamicBlockSparse(block=32, blocks=2), Quest(budget=64, page=16), Quest(budget=32, page=8, current=False)]

def rand_qkv(T, n=None, Hq=9, Hkv=3, D=64, seed=0):
    g = torch.Generator().manual_seed(seed); n = n or T
    return torch.randn(1, Hq, T, D, generator=g), torch.randn(1, Hkv, n, D, generator=g), torch.randn(1, Hkv, n, D, generator=g)

@pytest.mark.parametrize('m', methods(), ids=lambda m: type(m).__name__)
def test_equals_reference_random(m):
    for T, n in ((300, 300), (40, 300), (1, 120)): # prefill, a forward extending a cache, a decoded token
        assert max_error(m, *rand_qkv(T, n)) < 1e-5, (m.name, T, n)

def test_reference_is_the_definition():
    "`reference_attention` with a causal mask is SDPA with is_causal (GQA included)."
    q, k, v = rand_qkv(64)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.125)
    got = reference_attention(q, k, v, causal(torch.arange(64)[:, None], torch.arange(64)[None]), 0.125)
    assert (want - got).abs().max() < 1e-5

def test_masks_are_what_they_say():
    pos = torch.arange(64)
    m = method_mask(SinkWindow(sinks=4, window=8), *rand_qkv(64)[:2], 0.125)
    assert m.shape == (64, 64) and m.sum(-1).tolist() == [min(i + 1, 8) + max(0, min(4, i + 1 - 8)) for i in range(64)]
    assert method_mask(TopK(k=10), *rand_qkv(64)[:2], 0.125).sum(-1)[0, :, 20:].unique().tolist() == [10]
    mq = method_mask(DynamicBlockSparse(block=8, blocks=2), *rand_qkv(64)[:2], 0.125)[0] # [H, q, n]
    blocks = mq.view(9, 64, 8, 8).any(-1).view(9, 8, 8, 8).any(2) # per query block: which key blocks are touched
    assert (blocks.sum(-1) == torch.tensor([1, 2] + [3] * 6)).all() # its own block plus min(2, earlier) blocks
    assert (mq & ~causal(pos[:, None], pos[None])).sum() == 0

def test_gqa_heads_select_separately():
    "Each query head selects its own keys; heads sharing a KV head may differ."
    q, k, _ = rand_qkv(80)
    m = method_mask(TopK(k=5), q, k, 0.125)[0]
    assert not torch.equal(m[0], m[1]) # same KV head 0, different queries
    k2 = k.clone(); k2[:, 1] = 0 # zero KV head 1: its query heads 3-5 see ties, heads 0-2 unchanged
    assert torch.equal(method_mask(TopK(k=5), q, k2, 0.125)[0, :3], m[:3])

def test_flex_equals_reference():
    "FlexAttention block masks (compiled) equal the reference (shapes as in the chapter, so compiled kernels are reused)."
    for m in methods():
        if m.flex_block:
            f = type(m)(**{**m.values, 'backend': 'flex'})
            assert max_error(f, *rand_qkv(300)) < 1e-5, f.name
            assert f.kept_fraction < 1 and f.block_fraction <= 1
            if isinstance(f, (Window, BlockSparse, DynamicBlockSparse)): assert f.block_fraction < 1, f.name # at 300 tokens in 128-blocks, sinks and strides touch every block

def test_counters():
    "Kept and computed pairs are separate: a window computes what it keeps, top-k keeps k and computes every causal score."
    w = Window(window=50); w.attend(*rand_qkv(300), None, 0.125)
    assert abs(w.kept_fraction - w.count_kept(300) / (300 * 301 / 2)) < 1e-12 and w.computed_fraction == w.kept_fraction
    for t in (TopK(k=24), SparseWindow(k=12, window=12)):
        t.attend(*rand_qkv(300), None, 0.125)
        assert abs(t.kept_fraction - (9 * sum(min(i + 1, 24) for i in range(300))) / (9 * 300 * 301 / 2)) < 1e-12, t.name
        assert t.computed_fraction == 1.0 and t.n_computed == t.n_pairs == 9 * 300 * 301 // 2
    d = DynamicBlockSparse(block=32, blocks=2); d.attend(*rand_qkv(300), None, 0.125)
    assert d.n_bounds == 9 * 300 * 10 and d.computed_fraction > d.kept_fraction # a bound per query, head and key block
    # one decoding query: per KV head, the union over its 3 query heads; top-k reads every key and the kept values
    q, k, v = rand_qkv(1, 300)
    w.reset(); w.attend(q, k, v, None, 0.125); assert (w.n_read, w.n_held) == (3 * 2 * 50, 3 * 2 * 300)
    t = TopK(k=24); t.attend(q, k, v, None, 0.125)
    union = int(method_mask(t, q, k, 0.125)[0].view(3, 3, 300).any(1).sum())
    assert (t.n_read, t.n_held) == (3 * 300 + union, 3 * 2 * 300) and t.n_dkept == 9 * 24

def test_topk_ties():
    "Exact ties are broken towards the earlier key, whatever order topk returns them in."
    s = torch.tensor([[1., 3., 3., 2., 3., 3.]])
    assert topk_mask(s, torch.ones_like(s, dtype=torch.bool), 2).int().tolist() == [[0, 1, 1, 0, 0, 0]]
    assert topk_mask(s, torch.ones_like(s, dtype=torch.bool), 5).int().tolist() == [[0, 1, 1, 1, 1, 1]]
    z = torch.zeros(2, 3, 4, 40) # all scores tie: the first k keys, in every row
    assert (topk_mask(z, torch.ones_like(z, dtype=torch.bool), 7).nonzero()[:, -1].unique() == torch.arange(7)).all()

def direct_quest(q, k, budget, page, current=True):
    "Quest's page choice for one decoding query, by loops over heads and pages (the check, not the implementation)."
    Hq, Hkv, n = q.shape[1], k.shape[1], k.shape[2]; P = -(-n // page)
    npick = budget // page if current else max(3, budget // page)
    mask = torch.zeros(1, Hq, 1, n, dtype=torch.bool)
    for h in range(Hq):
        qq, kk = q[0, h, 0].double(), k[0, h // (Hq // Hkv)].double()
        bound = [float((qq * kk[p*page:(p+1)*page].amax(0)).maximum(qq * kk[p*page:(p+1)*page].amin(0)).sum()) for p in range(P)]
        ranked = sorted(range(P - 1) if current else range(P), key=lambda p: (-bound[p], p))
        for p in (ranked[:npick - 1] + [P - 1] if current else ranked[:npick]): mask[0, h, 0, p*page:(p+1)*page] = True
    return mask

@pytest.mark.parametrize('n', [300, 301, 317, 1000])
def test_quest_pages_direct(n):
    "Quest's choice for a decoding query equals the direct computation of the bound and top-k, for both page rules."
    q, k, v = rand_qkv(1, n, seed=n)
    for budget, cur in ((64, True), (64, False), (256, True), (48, False)):
        m = Quest(budget=budget, page=16, current=cur)
        assert torch.equal(method_mask(m, q, k, 0.125), direct_quest(q, k, budget, 16, cur)), (n, budget, cur)
        assert max_error(m, q, k, v) < 1e-5
    got = method_mask(Quest(budget=64, page=16), q, k, 0.125)[0, :, 0]
    assert (got[:, (n - 1) // 16 * 16:].all()) and (got.view(9, -1).sum(-1) == 48 + n - (n - 1) // 16 * 16).all() # current page + 3 full
    assert method_mask(Quest(budget=64, rank='token'), q, k, 0.125).sum(-1).unique().tolist() == [64]
    o = Quest(budget=64, rank='page_max'); pm = method_mask(o, q, k, 0.125)
    s = (q @ k.repeat_interleave(3, 1).transpose(-1, -2))[0, :, 0] # exact scores: the oracle's pages hold the best key of each head
    assert pm[0, :, 0].gather(-1, s.argmax(-1, keepdim=True)).all()

def test_quest_schedule():
    "Prefill dense in every layer; a decoding step dense in layers 0-1 and, beyond, exactly the directly computed pages; logits as dense when all layers are dense."
    t = tiny_lm('llama') # 4 layers, 4 query heads over 2 KV heads
    x = torch.randint(0, 500, (1, 72), generator=torch.Generator().manual_seed(3))
    def decode(method=None):
        with (method.apply(t) if method else torch.no_grad()), torch.no_grad():
            _, cache, _ = forward_cached(t, x[:, :64])
            return torch.cat([t.model(x[:, i:i+1], past_key_values=cache, use_cache=True).logits for i in range(64, 72)], 1)
    qt = Quest(budget=16, page=4); qt.trace = []
    sparse = decode(qt)
    assert [(r['layer'], r['q_len'], r['dense']) for r in qt.trace[:4]] == [(l, 64, True) for l in range(4)]
    steps = qt.trace[4:]
    assert [(r['layer'], r['k_len'], r['dense']) for r in steps] == [(l, 65 + i, l < 2) for i in range(8) for l in range(4)]
    for r in steps:
        want = torch.ones_like(r['mask']) if r['dense'] else direct_quest(r['q'], r['k'], 16, 4)
        assert torch.equal(r['mask'], want), (r['layer'], r['k_len'])
        if not r['dense']: assert (r['mask'].sum(-1) <= 16).all() and r['mask'][..., -1].all() # the budget; the newest key is read
    assert qt.n_kept == 4 * 4 * 64 * 65 // 2 + sum(int(r['mask'].sum()) for r in steps)
    assert qt.n_dpairs == 4 * 4 * sum(range(65, 73)) and qt.n_bounds == 2 * 4 * sum(-(-n // 4) - 1 for n in range(65, 73))
    dense = decode()
    assert (decode(Quest(budget=16, page=4, dense_layers=4)) - dense).abs().max() < 1e-5
    assert (decode(Quest(budget=128, page=4)) - dense).abs().max() < 1e-5 # the cache never exceeds the budget: dense
    assert (sparse - dense).abs().max() > 1e-4
    assert t.slots == {} and t.model.config._attn_implementation == 'sdpa'

def test_decode_mask():
    "`decode_mask` rows are the masks of real decoding steps, one query at a time."
    q, k, _ = rand_qkv(40, 120)
    m = Quest(budget=32, page=8)
    dm = decode_mask(m, q, k, 0.125)
    for i in (0, 17, 39):
        p = 80 + i
        assert torch.equal(dm[:, :, i:i+1, :p + 1], method_mask(m, q[:, :, i:i+1], k[:, :, :p + 1], 0.125)) and not dm[:, :, i, p + 1:].any()
    assert decode_mask(m, q, k, 0.125, layer=0).sum() == 9 * sum(range(81, 121))

@pytest.fixture(scope='module')
def smol(): return load('smollm2-135m')

@pytest.fixture(scope='module')
def smol_ids(smol):
    return Perplexity(split='eval', window=200, tokens=200)._ids(smol)[None]

def test_smollm2_attention_equals_reference(smol, smol_ids):
    rec = RecordQKV()
    with rec.apply(smol), torch.no_grad(): smol.model(smol_ids)
    assert smol.slots == {} and len(rec.seen) == 30
    for layer in (0, 17):
        q, k, v, sc = rec.seen[layer]
        assert (q.shape[1], k.shape[1]) == (9, 3)
        for m in methods(): assert max_error(m, q, k, v, sc) < 1e-5, (m.name, layer)

def test_smollm2_model(smol, smol_ids):
    "Wide masks give the dense logits; a window gives the reference chapter's LocalWindow logits; chunked prefill equals one forward."
    from workbench.methods import LocalWindow
    x = smol_ids
    with torch.no_grad():
        dense = smol.model(x).logits
        with Window(window=200).apply(smol): wide = smol.model(x).logits
        with TopK(k=200).apply(smol): allk = smol.model(x).logits
        with Window(window=32).apply(smol): w32 = smol.model(x).logits
        with LocalWindow(window=32).apply(smol): lw = smol.model(x).logits
    scale = dense.abs().max() # compare relative to the largest logit (fp32 noise over 30 layers)
    assert (dense - wide).abs().max() < 1e-5 * scale and (dense - allk).abs().max() < 1e-5 * scale
    assert (w32 - lw).abs().max() < 1e-5 * scale and (w32 - dense).abs().max() > 0.1
    for m in (SinkWindow(sinks=4, window=28), TopK(k=16)):
        with m.apply(smol):
            one, _, _ = forward_cached(smol, x)
            chunked, _, _ = forward_cached(smol, x, chunk=50)
        assert (one - chunked).abs().max() < 1e-3, m.name
    assert smol.model.config._attn_implementation == 'sdpa' and smol.slots == {}

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3'])
def test_architectures(arch):
    t = tiny_lm(arch)
    x = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = t.model(x).logits
        with Window(window=48).apply(t): same = t.model(x).logits
        assert (base - same).abs().max() < 1e-5
        for m in (SinkWindow(sinks=2, window=8), TopK(k=6), DynamicBlockSparse(block=8, blocks=1), BlockSparse(block=8, local=2, globals=1)):
            with m.apply(t):
                one, _, _ = forward_cached(t, x)
                chunked, _, _ = forward_cached(t, x, chunk=16) # chunks aligned to the blocks
            assert (one - chunked).abs().max() < 1e-4 and (one - base).abs().max() > 1e-4, (arch, m.name)
        with Quest(budget=8, page=4).apply(t): # dense prefill, sparse decoding steps
            pre, cache, _ = forward_cached(t, x[:, :40])
            steps = torch.cat([t.model(x[:, i:i+1], past_key_values=cache, use_cache=True).logits for i in range(40, 48)], 1)
        assert (pre - base[:, :40]).abs().max() < 1e-5 and (steps - base[:, 40:]).abs().max() > 1e-4, arch
    assert t.slots == {} and t.model.config._attn_implementation == 'sdpa'

def test_bytes(smol):
    from workbench.study import run_one
    d = droppable_kv(smol, SinkWindow(sinks=4, window=60), 1024)
    assert d['kv_bytes_full'] == kv_bytes_theory(smol.model, 1024) and d['kv_bytes_needed'] == kv_bytes_theory(smol.model, 64)
    assert droppable_kv(smol, Strided(), 1024)['kv_bytes_droppable'] == 0 and droppable_kv(smol, DynamicBlockSparse(), 1024)['kv_bytes_droppable'] == 0
    assert droppable_kv(smol, Quest(), 1024)['kv_bytes_droppable'] == 0
    full = kv_bytes_theory(smol.model, 1024) # Quest holds the full cache plus max and min of 64 pages in 28 layers; the oracles need no metadata
    assert Quest(budget=64).theory(smol, dict(kv=full, weights=0))['kv'] == full + 28 * 3 * 2 * 64 * 4 * 64
    assert Quest(budget=64, rank='token').theory(smol, dict(kv=full, weights=0))['kv'] == full
    ev = as_eviction(Window(window=32)) # the KV chapter's sliding-window cache of the same 32 tokens
    assert type(ev).__name__ == 'RecentOnly' and (ev.tokens, ev.ratio) == (32, 0.5) and as_eviction(TopK()) is None
    task = Perplexity(split='eval', window=128, tokens=128)
    base = run_one(smol, None, task)
    row = run_one(smol, SinkWindow(sinks=4, window=28), task, base=dict(weights=base['weight_bytes'], kv=base['kv_bytes']))
    assert row['simulated'] and row['kv_bytes'] == base['kv_bytes'] # a mask drops nothing
    assert row['kv_bytes_theory'] == kv_bytes_theory(smol.model, 32) # what a cache could hold

def test_bad_input():
    with pytest.raises(WorkbenchError, match='window=0'): Window(window=0)
    with pytest.raises(WorkbenchError, match=r'block=-8.*valid: \[1'): BlockSparse(block=-8)
    with pytest.raises(WorkbenchError, match='block=0'): DynamicBlockSparse(block=0)
    with pytest.raises(WorkbenchError, match='budget=8 is less than one page of 16 keys'): Quest(budget=8)
    with pytest.raises(WorkbenchError, match="valid: bound, page_max, token"): Quest(rank='exact')
    with pytest.raises(WorkbenchError, match='one decoding query at a time'): Quest().kept_mask(*rand_qkv(2, 300)[:2], None, None, None, 0.125)
    with pytest.raises(WorkbenchError, match="valid backend for it: 'sdpa'"): Quest(backend='flex')
    with pytest.raises(WorkbenchError, match='prefill=0'): DecodePerplexity(prefill=0)
    with pytest.raises(WorkbenchError, match="valid backend for it: 'sdpa'"): TopK(backend='flex')
    with pytest.raises(WorkbenchError, match="valid backend for it: 'sdpa'"): SparseWindow(backend='flex')
    with pytest.raises(WorkbenchError, match='valid: sdpa, flex'): Window(backend='cuda')
    with pytest.raises(WorkbenchError, match='valid: 1 to 300'): TopK(k=301).attend(*rand_qkv(300), None, 0.125)
    with pytest.raises(WorkbenchError, match=r'k \+ window <= 300'): SparseWindow(k=200, window=101).attend(*rand_qkv(300), None, 0.125)
    t = tiny_lm('gemma3')
    with pytest.raises(WorkbenchError, match='sliding-window layers'): Window(backend='flex').install(t)
    with Window(window=4).apply(t):
        with pytest.raises(WorkbenchError, match='already taken'): TopK(k=2).install(t)
    with pytest.raises(WorkbenchError, match='kind'): Window().install(tiny_lm('bert'))

def test_registry():
    "The explorer, the bench and the study take their patterns from the registry, in the order they are defined."
    from workbench.study import method_registry
    patterns = sparse_patterns()
    assert list(patterns) == ['Window', 'SinkWindow', 'Strided', 'BlockSparse', 'TopK', 'SparseWindow',
                              'DynamicBlockSparse', 'Quest'] # RecordQKV (a tool) and the bases left out
    assert all(method_registry()[n] is c for n, c in patterns.items())
    assert all(c.family == 'sparse' and c.simulated for c in patterns.values())
    assert [type(m).__name__ for m in bench_grid()] == [n for n, c in patterns.items() if c.flex_block]
    assert all(m.backend == 'flex' for m in bench_grid())
    assert [type(m).__name__ for m in study_grid(64)] == list(patterns)

def test_decode_tasks(smol):
    "Decoding perplexity without a method equals teacher-forced perplexity at the same positions; Quest's prompt is dense, its steps sparse; the needle's question is decoded."
    from workbench.data import split_ids
    dp = DecodePerplexity(prefill=64, decode=16)
    ref = dp.reference(smol); base = dp.run(smol, ref)
    x = split_ids(smol.tokenizer, 'eval-long', dp.n)
    with torch.no_grad(): lp = torch.log_softmax(smol.model(x[None]).logits[0, 64:80].float(), -1)
    assert abs(base['nll'] + lp.gather(1, x[65:81, None]).mean().item()) < 1e-4 and base['top1'] == 1.0 and abs(base['kl']) < 1e-9
    qm = Quest(budget=32, page=8)
    with qm.apply(smol): got = AttentionCounts(dp).run(smol, ref)
    assert got['kl'] > 0 and got['decode_kept_fraction'] < got['read_fraction'] < 1 and got['kept_fraction'] > 0.5
    assert qm.n_pairs - qm.n_dpairs == 9 * 30 * 64 * 65 // 2 and qm.n_dpairs == 9 * 30 * sum(range(65, 81))
    seen = []
    class Count(Window):
        def attend(self, q, k, v, allowed, scaling, layer=None):
            if layer == 0: seen.append(q.shape[2])
            return super().attend(q, k, v, allowed, scaling, layer)
    with Count(window=4096).apply(smol): DecodeNeedle(lengths=(128,), trials=1).run(smol)
    assert seen[0] == 128 and set(seen[1:]) == {1} and len(seen) > 6 # context, then question and answer one token at a time

def test_one_entry_point_and_sliding_layers():
    "Sparse methods install by `methods.use_attention`: sliding layers keep their SDPA; on exit the model is as before."
    from workbench.methods import attention_configs
    t = tiny_lm('gemma3'); x = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(2))
    snap = lambda: [dict(vars(c)) for c in attention_configs(t.model)]
    with torch.no_grad(): base = t.model(x).logits
    before, m = snap(), Window(window=8)
    m.trace = []
    with m.apply(t), torch.no_grad():
        assert t.model.config._attn_implementation == 'workbench' and t.slot('attention') is m
        t.model(x)
    assert [r['layer'] for r in m.trace] == [3] # the one full-attention layer; layers 0-2 slide (window 16)
    with pytest.raises(RuntimeError, match='inside'):
        with TopK(k=4).apply(t): raise RuntimeError('inside')
    assert snap() == before and t.slots == {}
    with torch.no_grad(): assert torch.equal(t.model(x).logits, base)
