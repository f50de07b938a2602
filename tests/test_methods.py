"""The one attention entry point: `use_attention` runs a method's `attend` and gives the model back exactly."""
import pytest, torch
from workbench.methods import STASH, LocalWindow, attention_configs, keys, queries, sdpa, use_attention
from workbench.models import tiny_lm

class Plain:
    "The model's own attention as a method: SDPA, causal in a decoder."
    def __init__(self, causal=True): self.causal, self.calls = causal, 0
    name = 'Plain'
    def attend(self, q, k, v, allowed, scaling, layer=None):
        self.calls += 1; return sdpa(q, k, v, allowed, scaling, causal=self.causal)

class Broken(Plain):
    name = 'Broken'
    def attend(self, *args, **kwargs): raise RuntimeError('broken attend')

def snapshot(lm):
    "Every attribute of every config the attention modules read (`vars`: the attention implementation included)."
    return [(id(c), dict(vars(c))) for c in attention_configs(lm.model)]

def output(lm, x):
    with torch.no_grad():
        out = lm.model(x)
    return out.logits if lm.kind == 'causal' else out.last_hidden_state

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3', 'bert'])
def test_use_attention_restores_exactly(arch):
    lm = tiny_lm(arch); x = torch.randint(5, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    base, before, impl = output(lm, x), snapshot(lm), lm.model.config._attn_implementation
    m = Plain(causal=lm.kind == 'causal')
    with use_attention(lm, m):
        assert lm.model.config._attn_implementation == 'workbench' and lm.slot('attention') is m
        assert all(getattr(c, STASH) is m for c in attention_configs(lm.model))
        assert torch.equal(output(lm, x), base) and m.calls == 4 # the entry point adds nothing, bit for bit
    assert snapshot(lm) == before and lm.slots == {} and lm.model.config._attn_implementation == impl
    with pytest.raises(RuntimeError, match='broken attend'): # an error in a forward
        with use_attention(lm, Broken()): output(lm, x)
    assert snapshot(lm) == before and lm.slots == {}
    with pytest.raises(KeyError): # an error in the body
        with use_attention(lm, Plain()): raise KeyError('inside')
    assert snapshot(lm) == before and lm.slots == {}
    with pytest.raises(ValueError, match="slot 'attention' is already taken by Plain"): # a second attention method
        with use_attention(lm, Plain()), use_attention(lm, Plain()): pass
    assert snapshot(lm) == before and lm.slots == {}
    assert torch.equal(output(lm, x), base)

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_local_window_through_the_entry_point(arch):
    lm = tiny_lm(arch); x = torch.randint(5, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    base, before = output(lm, x), snapshot(lm)
    with LocalWindow(window=24).apply(lm): wide = output(lm, x)
    with LocalWindow(window=4).apply(lm): narrow = output(lm, x)
    assert (wide - base).abs().max() < 1e-5 and (narrow - base).abs().max() > 1e-3
    assert snapshot(lm) == before and lm.slots == {} and torch.equal(output(lm, x), base)

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3'])
def test_queries_keys_are_what_attention_receives(arch):
    lm = tiny_lm(arch); x = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    mod, got, seen = lm.model.model.layers[1].self_attn, {}, []
    class Keep(Plain):
        def attend(self, q, k, v, allowed, scaling, layer=None):
            if layer == 1: seen.append((q, k))
            return super().attend(q, k, v, allowed, scaling, layer)
    h = mod.register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    try:
        with use_attention(lm, Keep()), torch.no_grad(): lm.model(x)
    finally: h.remove()
    (q, k), = seen
    with torch.no_grad():
        assert torch.equal(queries(mod, got['hidden_states'], got['position_embeddings']), q)
        assert torch.equal(keys(mod, got['hidden_states'], got['position_embeddings']), k)
