"""Token dropping and merging: in-model ViT/BERT methods (random, EViT, HiRED, ToMe) with size-weighted pooling,
FastV inside a causal LM, and prompt pruning (AttnPrune, SelfInfo, random)."""
import pytest, torch
import torch.nn.functional as F
from workbench.core import WorkbenchError
from workbench.models import load, tiny_lm
from workbench.tokens.vision import (RandomPatchDrop, EViT, HiRED, ToMe, TokenProbe, TokenState, bipartite_merge, max_r,
                                     split_budget, metered, token_map, pool_weights, size_pool, token_features)
from workbench.tokens.text import (FastV, AttnPrune, SelfInfo, RandomPrompt, PromptNeedle, ContinuationPPL, prefill,
                                   received_attention, top_tokens, causal_mask_for)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from workbench.encoders import fashion_subset, vit_inputs

torch.set_num_threads(1)

@pytest.fixture(scope='module')
def vit(): return load('dinov2-s14')

@pytest.fixture(scope='module')
def px():
    x, _ = fashion_subset('test', 4)
    return vit_inputs(x, 112)

def forward(lm, px, method=None):
    with torch.no_grad():
        if method is None: return lm.model(pixel_values=px).last_hidden_state
        with method.apply(lm): return lm.model(pixel_values=px).last_hidden_state

def test_wrapped_blocks_match_model(vit, px):
    base = forward(vit, px)
    assert torch.allclose(forward(vit, px, RandomPatchDrop(keep=1.0)), base, atol=1e-4)
    assert torch.equal(forward(vit, px), base) and vit.slots == {}

def test_token_method_gives_the_model_back(vit, px):
    "A token method installs through `methods.use_attention`; on exit (even by an error) the model is as before."
    from workbench.methods import attention_configs, use_attention
    snap = lambda: [dict(vars(c)) for c in attention_configs(vit.model)]
    base, before, m = forward(vit, px), snap(), ToMe(r=2)
    with m.apply(vit):
        assert vit.model.config._attn_implementation == 'workbench' and vit.slot('attention') is m
    assert snap() == before and vit.slots == {}
    with pytest.raises(RuntimeError, match='inside'):
        with ToMe(r=2).apply(vit): raise RuntimeError('inside')
    assert snap() == before and vit.slots == {}
    holder = type('Holder', (), {'name': 'Holder'})() # another method holding the attention slot
    with use_attention(vit, holder):
        with pytest.raises(WorkbenchError, match="slot 'attention' is already taken by Holder"):
            ToMe(r=2).apply(vit).__enter__()
        assert list(vit.slots) == ['attention'] # the tokens slot was given back
    assert snap() == before and vit.slots == {} and torch.equal(forward(vit, px), base)

@pytest.mark.parametrize('method,final', [(RandomPatchDrop(keep=0.25), 17), (EViT(keep=0.25, layer=3), 17),
                                          (EViT(keep=0.25, layer=3, fuse=False), 17), (HiRED(keep=0.1, layer=3), 7)])
def test_drop_really_shrinks(vit, px, method, final):
    out = forward(vit, px, method)
    assert out.shape == (4, final, 384)
    assert method.state.tokens[-1] == final

def test_tome_sizes_and_tokens(vit, px):
    m = ToMe(r=4)
    out = forward(vit, px, m)
    assert out.shape == (4, 65, 384) # spread back to the input positions
    assert m.state.tokens == [65 - 4 * i for i in range(12)]
    assert torch.equal(m.state.size.sum(1), torch.full((4,), 65.))
    assert (m.state.owner[:, 0] == 0).all() # CLS never merged

def test_proportional_attention_helps(vit, px):
    base = forward(vit, px)
    cos = {p: F.cosine_similarity(forward(vit, px, ToMe(r=4, prop_attn=p))[:, 0], base[:, 0]).mean().item() for p in (True, False)}
    assert cos[True] > cos[False], cos

def test_size_pool():
    h = torch.tensor([[[9., 9], [1, 0], [0, 1]]])
    f = size_pool(h, torch.tensor([[3., 1]]))
    assert torch.allclose(f, torch.tensor([[9., 9, 0.75, 0.25]])) # CLS, then (3 * t1 + 1 * t2) / 4
    assert torch.equal(size_pool(h, torch.ones(1, 2), 'cls'), h[:, 0])

@pytest.mark.parametrize('method,held', [(RandomPatchDrop(keep=0.25), 16), (EViT(keep=0.25, layer=3, fuse=False), 16),
                                         (EViT(keep=0.25, layer=3), 64), (HiRED(keep=0.25, layer=3), 16),
                                         (ToMe(r=4), 64)])
def test_pool_weights_sum_to_patches_kept(vit, px, method, held):
    with method.apply(vit), torch.no_grad():
        method.state.spread = False
        h = vit.model(pixel_values=px).last_hidden_state
        w = pool_weights(method.state, *h.shape[:2])
    assert h.shape[1] == 17 and torch.equal(w.sum(1), torch.full((4,), float(held)))
    if isinstance(method, EViT) and method.fuse: assert torch.equal(w[:, -1], torch.full((4,), 49.)) # fused: 49 patches

def test_token_features_pool_sizes(vit, px):
    x, _ = fashion_subset('test', 4)
    from workbench.encoders import vit_features
    unpooled = vit_features(vit, x, size=112)
    assert torch.allclose(token_features(vit, x, size=112), unpooled, atol=1e-5) # no method: the plain mean
    with ToMe(r=4).apply(vit):
        merged = token_features(vit, x, size=112)
        with torch.no_grad(): spread = vit.model(pixel_values=px).last_hidden_state
    assert torch.allclose(merged, torch.cat([spread[:, 0], spread[:, 1:].mean(1)], -1), atol=1e-5)
    with EViT(keep=0.25, layer=3).apply(vit):
        f = token_features(vit, x, size=112)
        with torch.no_grad(): out = vit.model(pixel_values=px).last_hidden_state # CLS, 15 kept, the fused one
    plain = torch.cat([out[:, 0], out[:, 1:].mean(1)], -1)
    weighted = torch.cat([out[:, 0], (out[:, 1:-1].sum(1) + 49 * out[:, -1]) / 64], -1)
    assert torch.allclose(f, weighted, atol=1e-5) and not torch.allclose(f, plain, atol=1e-3)

def test_metered_flops(vit, px):
    m = EViT(keep=0.25, layer=4)
    with m.apply(vit), metered(vit.model) as meter, torch.no_grad(): vit.model(pixel_values=px)
    d = meter.per_image()
    assert d['attn_flops'] == 4 * 4 * 65**2 * 384 + 8 * 4 * 17**2 * 384
    assert d['act_bytes'] == (4 * 65 + 8 * 17) * 384 * 4

def test_bad_input(vit, px):
    with pytest.raises(WorkbenchError, match='keep=0.0'): EViT(keep=0.0)
    with pytest.raises(WorkbenchError, match='keep=1.5'): HiRED(keep=1.5)
    with pytest.raises(WorkbenchError, match=r'valid: layer in \[1, 11\]'): EViT(layer=12).apply(vit).__enter__()
    with pytest.raises(WorkbenchError, match=r'valid: r in \[0, 4\]'): forward(vit, px, ToMe(r=5))
    with pytest.raises(WorkbenchError, match='parts=9'): forward(vit, px, HiRED(keep=0.5, layer=2, parts=9))
    assert vit.slots == {}
    assert torch.equal(forward(vit, px), forward(vit, px))

def test_split_budget():
    b = split_budget(torch.tensor([5., 1, 1, 1]), torch.tensor([4, 4, 4, 4]), 10)
    assert b.sum() == 10 and (b <= 4).all() and b[0] == 4

def test_max_r():
    assert max_r(257, 12) == 19 and max_r(65, 12) == 4 and max_r(3, 1) == 1 and max_r(2, 1) == 0

def test_token_map(vit):
    x, _ = fashion_subset('test', 1)
    m = token_map(vit, EViT(keep=0.5, layer=2, fuse=False), x[0], size=112)
    assert int((m['owner'] >= 0).sum()) == 32 and m['side'] == 8

def test_tiny_bert_generality():
    lm = tiny_lm('bert')
    ids = torch.randint(5, 500, (1, 40))
    with torch.no_grad(): base = lm.model(input_ids=ids).last_hidden_state
    for m in (ToMe(r=3), ToMe(r=0, ratio=0.3), EViT(keep=0.5, layer=1, fuse=False)):
        with m.apply(lm), torch.no_grad(): out = lm.model(input_ids=ids).last_hidden_state
        assert out.shape[-1] == 64 and m.state.tokens[-1] < 40
    with torch.no_grad(): assert torch.equal(lm.model(input_ids=ids).last_hidden_state, base)
    with pytest.raises(WorkbenchError, match='unpadded'):
        with ToMe(r=2).apply(lm), torch.no_grad(): lm.model(input_ids=ids.expand(2, -1), attention_mask=torch.tensor([[1] * 40, [1] * 30 + [0] * 10]))

def test_tiny_llama_prompt_drop():
    lm = tiny_lm('llama')
    ids = torch.randint(0, 512, (50,))
    a = received_attention(lm, ids, 1)
    assert a.shape == (50,) and abs(a.sum().item() - 1) < 1e-9
    for m in (AttnPrune(keep=0.3, layer=1), SelfInfo(keep=0.3), RandomPrompt(keep=0.3), FastV(keep=0.3, layer=1)):
        k = m.kept_positions(lm, ids, torch.randint(0, 512, (5,)))
        assert len(k) == 15 and torch.equal(k, k.sort().values)
    with pytest.raises(WorkbenchError, match=r'valid: layer in \[1, 3\]'): FastV(layer=4).apply(lm).__enter__()
    with pytest.raises(WorkbenchError, match=r'valid: layer in \[1, 3\]'): AttnPrune(layer=4).apply(lm).__enter__()
    assert lm.slots == {}

def test_top_tokens_ties():
    assert top_tokens(torch.tensor([1., 3, 3, 0, 3]), torch.arange(5), 2).tolist() == [1, 2] # ties: earlier tokens
    assert top_tokens(torch.zeros(6), torch.tensor([1, 3, 5]), 2).tolist() == [1, 3]
    assert causal_mask_for(1, 9) is None and causal_mask_for(4, 0) is None
    assert causal_mask_for(2, 3)[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]

@torch.no_grad()
def direct_fastv(lm, ids, K, m, n_ctx, extra=None):
    "FastV written out block by block, eager attention ranking: logits of the kept tokens (+ `extra`), kept positions."
    base, T = lm.model.model, len(ids)
    full = ids if extra is None else torch.cat([ids, extra])
    x = base.embed_tokens(full[None]); pos = torch.arange(len(full))[None]
    cos, sin = base.rotary_emb(x, pos); h = x
    for i in range(K - 1): h = base.layers[i](h, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
    L = base.layers[K - 1]; a = L.self_attn; hn = L.input_layernorm(h[:, :T])
    q, k = [p(hn).view(1, T, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj)]
    q, k = apply_rotary_pos_emb(q, k, cos[:, :T], sin[:, :T])
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    w = q @ repeat_kv(k, a.num_key_value_groups).transpose(-1, -2) * a.scaling
    w = w.masked_fill(causal, float('-inf')).softmax(-1)
    score = w.mean(1)[0, -1][:n_ctx] # heads averaged, the last token's row, context only
    kept = torch.cat([score.topk(m).indices.sort().values, torch.arange(n_ctx, len(full))])
    h = L(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)[:, kept]
    for i in range(K, len(base.layers)):
        h = base.layers[i](h, attention_mask=None, position_embeddings=(cos[:, kept], sin[:, kept]))
    return lm.model.lm_head(base.norm(h)), kept

@pytest.mark.parametrize('K,keep', [(1, 0.5), (2, 0.5), (2, 0.25), (3, 0.1)])
def test_fastv_mechanism(K, keep):
    lm = tiny_lm('llama')
    g = torch.Generator().manual_seed(K)
    ctx, qst = torch.randint(0, 512, (40,), generator=g), torch.randint(0, 512, (5,), generator=g)
    nxt = torch.tensor([7, 9, 11])
    m, kept_n = FastV(keep=keep, layer=K), max(1, round(keep * 40))
    with m.apply(lm):
        p = prefill(lm, ctx, qst)
        step = lm.model(nxt[None, :1], past_key_values=p['cache'], use_cache=True).logits
        chunk = lm.model(nxt[None, 1:], past_key_values=p['cache'], use_cache=True).logits
    assert p['layer_tokens'] == [45] * K + [kept_n + 5] * (4 - K) # n tokens in blocks < K, the kept count from K on
    per = 2 * 2 * 16 * 4 # K,V x 2 KV heads x head_dim 16 x fp32
    assert p['kv_bytes'] == per * (45 * K + (kept_n + 5) * (4 - K)) and p['kept'] == kept_n
    ref, kept = direct_fastv(lm, torch.cat([ctx, qst]), K, kept_n, 40)
    assert torch.equal(m.kept, kept)
    assert torch.allclose(p['logits'], ref, atol=1e-5)
    prompt = torch.cat([ctx, qst])
    assert torch.allclose(step[0, -1], direct_fastv(lm, prompt, K, kept_n, 40, nxt[:1])[0][0, -1], atol=1e-5)
    assert torch.allclose(chunk[0], direct_fastv(lm, prompt, K, kept_n, 40, nxt)[0][0, -2:], atol=1e-5)
    assert lm.slots == {}

def test_fastv_keep_all_and_refusals():
    lm = tiny_lm('llama')
    ids = torch.randint(0, 512, (30,))
    with torch.no_grad(): base = lm.model(ids[None]).logits
    with FastV(keep=1.0, layer=2).apply(lm), torch.no_grad():
        assert torch.allclose(lm.model(ids[None]).logits, base, atol=1e-5) # keeping every token changes nothing
        p = prefill(lm, ids) # no question: the last context token is the query and stays
        assert p['layer_tokens'] == [30] * 4
    m = FastV(keep=0.5, layer=2)
    with m.apply(lm):
        p = prefill(lm, ids)
        # round(14.5) = 14 of the 29 candidates (Python's round, as in FastV's code) + the last token
        assert 29 in m.kept.tolist() and p['layer_tokens'] == [30, 30, 15, 15]
        with pytest.raises(WorkbenchError, match='one prompt at a time'): lm.model(ids[None].expand(2, -1))
    assert lm.slots == {}

def test_fastv_refused_by_id_filter_tasks():
    lm = tiny_lm('llama') # a task that filters prompt ids (NeedleTask) calls the slot's value: FastV's refuses
    with FastV().apply(lm):
        with pytest.raises(WorkbenchError, match='prunes inside the model'): lm.slot('tokens')(torch.arange(5))

def test_registry_finds_token_methods():
    from workbench.study import method_registry
    from workbench.tokens.vision import vision_token_methods
    from workbench.tokens.text import text_token_methods
    reg = method_registry()
    for name in ('RandomPatchDrop', 'EViT', 'HiRED', 'ToMe', 'FastV', 'AttnPrune', 'SelfInfo', 'RandomPrompt'):
        assert reg[name].family == 'tokens'
    assert 'PatchDrop' not in reg and 'PromptDrop' not in reg # bases (`abstract`)
    assert list(vision_token_methods()) == ['RandomPatchDrop', 'EViT', 'HiRED', 'ToMe'] # what the explorers offer
    assert list(text_token_methods()) == ['RandomPrompt', 'AttnPrune', 'SelfInfo', 'FastV']

@pytest.mark.slow
def test_smollm2_prompt_drop_bytes():
    lm = load('smollm2-135m')
    t = PromptNeedle(length=256, trials=2)
    full = t.run(lm)
    with AttnPrune(keep=0.5, layer=2).apply(lm): half = t.run(lm)
    with FastV(keep=0.5, layer=2).apply(lm): fv = t.run(lm)
    assert full['needle_acc'] == 1.0
    per = 2 * 3 * 64 * 4 # bytes per token and block
    n = full['kv_bytes'] / (per * 30) # prompt tokens (context + question)
    assert half['kv_bytes'] == per * 30 * (n - 128) # prompt pruning: 128 context tokens fewer in every block
    assert fv['kv_bytes'] == per * (2 * n + 28 * (n - 128)) # FastV: all tokens in blocks 0-1, 128 fewer from block 2 on
    c = ContinuationPPL(context=256, continuation=32, windows=1)
    c0 = c.run(lm)
    with RandomPrompt(keep=1.0).apply(lm): assert abs(c.run(lm)['ppl'] - c0['ppl']) < 1e-3 * c0['ppl']
    with FastV(keep=1.0).apply(lm): assert abs(c.run(lm)['ppl'] - c0['ppl']) < 1e-3 * c0['ppl']

@pytest.mark.slow
def test_probe_with_drop(vit):
    task = TokenProbe(n_train=50, n_test=50, size=112)
    ref = task.reference(vit)
    with EViT(keep=0.25, layer=4).apply(vit): r = task.run(vit, ref)
    assert r['tokens_per_block'] == (4 * 65 + 8 * 17) / 12 and 0 <= r['probe_acc'] <= 1

@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_vision_methods_in_16_bit(px, dtype):
    "Each ViT token method runs in a 16-bit model: 16-bit outputs, finite, fewer tokens in the last block."
    vit16, x = load('dinov2-s14', dtype=dtype), px.to(getattr(torch, dtype))
    for method in (RandomPatchDrop(keep=0.25), EViT(keep=0.25, layer=3), HiRED(keep=0.1, layer=3), ToMe(r=4)):
        out = forward(vit16, x, method)
        assert out.dtype == getattr(torch, dtype) and torch.isfinite(out).all(), method
        assert method.state.tokens[-1] < (x.shape[-1] // 14) ** 2 + 1, method # patches + CLS; ToMe unmerges its output
    assert torch.isfinite(forward(vit16, x)).all() and vit16.slots == {}
