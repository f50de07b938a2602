"Token dropping and merging: in-model ViT/BERT methods (random, EViT, HiRED, ToMe) and prompt dropping for causal LMs (FastV, SelfInfo, random)."
import pytest, torch
import torch.nn.functional as F
from workbench.core import WorkbenchError
from workbench.models import load, tiny_lm
from workbench.tokens_vision import (RandomPatchDrop, EViT, HiRED, ToMe, TokenProbe, TokenState, bipartite_merge, max_r,
                                     split_budget, metered, token_map)
from workbench.tokens_text import FastV, SelfInfo, RandomPrompt, PromptNeedle, ContinuationPPL, prefill, received_attention
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
    assert a.shape == (50,) and abs(a.sum().item() - 1) < 1e-4
    for m in (FastV(keep=0.3, layer=1), SelfInfo(keep=0.3), RandomPrompt(keep=0.3)):
        k = m.select(lm, ids, torch.randint(0, 512, (5,)))
        assert len(k) == 15 and torch.equal(k, k.sort().values)
    with pytest.raises(WorkbenchError, match=r'valid: layer in \[0, 3\]'): FastV(layer=4).apply(lm).__enter__()
    assert lm.slots == {}

def test_registry_finds_token_methods():
    from workbench.study import method_registry
    reg = method_registry()
    for name in ('RandomPatchDrop', 'EViT', 'HiRED', 'ToMe', 'FastV', 'SelfInfo', 'RandomPrompt'):
        assert reg[name].family == 'tokens'

@pytest.mark.slow
def test_smollm2_prompt_drop_bytes():
    lm = load('smollm2-135m')
    t = PromptNeedle(length=256, trials=2)
    full = t.run(lm)
    with FastV(keep=0.5, layer=2).apply(lm): half = t.run(lm)
    assert full['needle_acc'] == 1.0
    assert half['kv_bytes'] < 0.55 * full['kv_bytes']
    c = ContinuationPPL(context=256, continuation=32, windows=1)
    c0 = c.run(lm)
    with RandomPrompt(keep=1.0).apply(lm): assert abs(c.run(lm)['ppl'] - c0['ppl']) < 1e-3 * c0['ppl']

@pytest.mark.slow
def test_probe_with_drop(vit):
    task = TokenProbe(n_train=50, n_test=50, size=112)
    ref = task.reference(vit)
    with EViT(keep=0.25, layer=4).apply(vit): r = task.run(vit, ref)
    assert r['tokens_per_block'] == (4 * 65 + 8 * 17) / 12 and 0 <= r['probe_acc'] <= 1
