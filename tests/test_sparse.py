"Sparse attention: every mask against the masked-SDPA definition (random inputs, SmolLM2, GQA), both backends, chunked prefill, other architectures, bytes and bad input."
import pytest, torch
from workbench.core import WorkbenchError
from workbench.models import tiny_lm, load
from workbench.ledger import kv_bytes_theory
from workbench.sparse import (Window, SinkWindow, Strided, BlockSparse, TopK, SparseWindow, QuestBlocks, RecordQKV, SPARSE_METHODS,
                              max_error, method_mask, reference_attention, droppable_kv, as_eviction, causal)
from workbench.tasks import forward_cached, Perplexity

torch.set_num_threads(1)

def methods():
    return [Window(window=50), SinkWindow(sinks=4, window=40), Strided(window=16, stride=7), BlockSparse(block=32, local=2, globals=1),
            TopK(k=24), SparseWindow(k=16, window=16), QuestBlocks(block=32, blocks=2)]

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
    mq = method_mask(QuestBlocks(block=8, blocks=2), *rand_qkv(64)[:2], 0.125)[0] # [H, q, n]
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
            assert f.attention_fraction < 1 and f.block_fraction <= 1
            if isinstance(f, (Window, BlockSparse, QuestBlocks)): assert f.block_fraction < 1, f.name # at 300 tokens in 128-blocks, sinks and strides touch every block

def test_counters():
    w = Window(window=50); w.attend(*rand_qkv(300), None, 0.125)
    assert abs(w.attention_fraction - w.count_kept(300) / (300 * 301 / 2)) < 1e-12
    t = TopK(k=24); t.attend(*rand_qkv(300), None, 0.125)
    assert abs(t.attention_fraction - (9 * sum(min(i + 1, 24) for i in range(300))) / (9 * 300 * 301 / 2)) < 1e-12

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
        for m in (SinkWindow(sinks=2, window=8), TopK(k=6), QuestBlocks(block=8, blocks=1), BlockSparse(block=8, local=2, globals=1)):
            with m.apply(t):
                one, _, _ = forward_cached(t, x)
                chunked, _, _ = forward_cached(t, x, chunk=16) # chunks aligned to the blocks
            assert (one - chunked).abs().max() < 1e-4 and (one - base).abs().max() > 1e-4, (arch, m.name)
    assert t.slots == {} and t.model.config._attn_implementation == 'sdpa'

def test_bytes(smol):
    from workbench.study import run_one
    d = droppable_kv(smol, SinkWindow(sinks=4, window=60), 1024)
    assert d['kv_bytes_full'] == kv_bytes_theory(smol.model, 1024) and d['kv_bytes_needed'] == kv_bytes_theory(smol.model, 64)
    assert droppable_kv(smol, Strided(), 1024)['kv_bytes_droppable'] == 0 and droppable_kv(smol, QuestBlocks(), 1024)['kv_bytes_droppable'] == 0
    assert as_eviction(Window(window=32)).name == 'RecentOnly(ratio=0.5, tokens=32)' and as_eviction(TopK()) is None
    task = Perplexity(split='eval', window=128, tokens=128)
    base = run_one(smol, None, task)
    row = run_one(smol, SinkWindow(sinks=4, window=28), task, base=dict(weights=base['weight_bytes'], kv=base['kv_bytes']))
    assert row['simulated'] and row['kv_bytes'] == base['kv_bytes'] # a mask drops nothing
    assert row['kv_bytes_theory'] == kv_bytes_theory(smol.model, 32) # what a cache could hold

def test_bad_input():
    with pytest.raises(WorkbenchError, match='window=0'): Window(window=0)
    with pytest.raises(WorkbenchError, match=r'block=-8.*valid: \[1'): BlockSparse(block=-8)
    with pytest.raises(WorkbenchError, match='block=0'): QuestBlocks(block=0)
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
    from workbench.study import method_registry
    assert set(SPARSE_METHODS) <= set(method_registry())
    assert all(c.family == 'sparse' and c.simulated for c in SPARSE_METHODS.values())
