"Every registered Method, found by the registry: knobs checked, the model restored bit for bit, on tiny configs."
import pytest, torch
from workbench.core import WorkbenchError
from workbench.ledger import cache_bytes, weight_bytes
from workbench.methods import new_cache
from workbench.models import tiny_lm
from workbench.methods import decoder_linears
from workbench.quant.methods import LinearMethod, targets
from workbench.study import method_registry

METHODS = method_registry()
CONCRETE = METHODS # the bases (declared `abstract`) are left out by the registry

def bad_value(knob):
    "A value `knob` must refuse, or None when every value of its type is valid."
    if knob.kind == 'bool': return 'yes'
    if knob.kind == 'choice': return object()
    if knob.kind == 'text': return 12
    if knob.low is not None: return knob.low - 1
    if knob.high is not None: return knob.high + 1
    return None

@pytest.mark.parametrize('name', list(CONCRETE), ids=[f'{n}-of-{len(CONCRETE)}' for n in CONCRETE])
def test_knobs_are_checked(name):
    cls = CONCRETE[name]
    for knob in cls.knobs:
        v = bad_value(knob)
        if v is not None:
            with pytest.raises(WorkbenchError, match=knob.name): cls(**{knob.name: v})
    with pytest.raises(WorkbenchError, match='nope'): cls(nope=1)

def state(lm):
    "Everything `apply` may touch: parameters and buffers, module types, attention implementation, slots."
    return ({k: v.clone() for k, v in lm.model.state_dict().items()}, [type(m) for m in lm.model.modules()],
            lm.model.config._attn_implementation, dict(lm.slots))

CAUSAL = [n for n, c in CONCRETE.items() if c.family in ('quant', 'kv', 'sparse') or c.__module__.endswith('tokens.text')]

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'gemma3'])
@pytest.mark.parametrize('name', CAUSAL)
def test_apply_restores_the_model(name, arch):
    lm, x = tiny_lm(arch, hidden=256, heads=4, kv_heads=2), torch.randint(0, 500, (1, 160)) # head_dim 64, as SmolLM2
    def prefill_and_step(): # a prompt, then one decoding step (deferred policies evict at the next forward)
        out = lm.model(x, past_key_values=new_cache(lm), use_cache=True)
        return out.logits, lm.model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True).past_key_values
    with torch.no_grad(): before, cache = prefill_and_step()
    full_cache, full_weights = cache_bytes(cache), weight_bytes(lm.model)
    s0, method = state(lm), CONCRETE[name]()
    try: undo = method.install(lm)
    except WorkbenchError as e: pytest.skip(f'refuses {arch} with a clear error: {e}') # a declared refusal conforms
    try:
        with torch.no_grad(): logits, cache = prefill_and_step()
        kept = logits.shape[1] if method.family == 'tokens' else x.shape[1] # token methods drop prompt positions
        assert logits.shape == (1, kept, before.shape[-1]) and torch.isfinite(logits).all()
        if not method.simulated: # the bytes it claims to save are really gone
            if method.family == 'quant': assert weight_bytes(lm.model) < full_weights
            if method.family == 'kv': assert cache_bytes(cache) < full_cache
    finally: undo()
    s1 = state(lm)
    assert s1[1:] == s0[1:] and s1[0].keys() == s0[0].keys()
    assert all(torch.equal(s0[0][k], s1[0][k]) for k in s0[0])
    with torch.no_grad(): assert torch.equal(prefill_and_step()[0], before)

DTYPES = ['bfloat16', 'float16']

CALIBRATED = {'BitStack', 'GPTQ', 'HQQPeer', 'KMeans', 'MixedPrecision'} # 10-70 s each: their 16-bit runs are slow
AS_16_BIT = [pytest.param(n, marks=pytest.mark.slow) if n in CALIBRATED else n for n in CAUSAL]

@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', AS_16_BIT)
def test_runs_in_16_bit(name, dtype):
    "In a 16-bit model a method computes in that dtype (no silent upcast), saves what it claims, and restores it."
    lm, x = tiny_lm('llama', hidden=128, heads=2, kv_heads=1, dtype=dtype), torch.randint(0, 500, (1, 160)) # head_dim 64
    def prefill_and_step():
        out = lm.model(x, past_key_values=new_cache(lm), use_cache=True)
        return out.logits, lm.model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True).past_key_values
    with torch.no_grad(): before, cache = prefill_and_step()
    full_cache, full_weights, method = cache_bytes(cache), weight_bytes(lm.model), CONCRETE[name]()
    try: undo = method.install(lm)
    except WorkbenchError as e: pytest.skip(f'refuses {dtype} with a clear error: {e}')
    try:
        with torch.no_grad(): logits, cache = prefill_and_step()
        assert logits.dtype == getattr(torch, dtype) and torch.isfinite(logits).all()
        assert {p.dtype for p in lm.model.parameters() if p.is_floating_point()} == {getattr(torch, dtype)}
        if not method.simulated:
            if method.family == 'quant': assert weight_bytes(lm.model) < full_weights
            if method.family == 'kv': assert cache_bytes(cache) < full_cache
    finally: undo()
    with torch.no_grad(): assert torch.equal(prefill_and_step()[0], before)

@pytest.mark.parametrize('name', [n for n in CAUSAL if CONCRETE[n].family == 'quant'])
def test_weight_theory_follows_the_dtype(name):
    "A quantizer's theoretical saving starts from the weights as the model holds them: 2 bytes a value in bfloat16."
    lms = {d: tiny_lm('llama', hidden=128, heads=2, kv_heads=1, dtype=d) for d in ('float32', 'bfloat16')}
    method, saved = CONCRETE[name](), {}
    for d, lm in lms.items():
        base = weight_bytes(lm.model); th = method.theory(lm, dict(weights=base, kv=0))
        if th is None: pytest.skip(f'{name} is measured only (no theory)')
        saved[d] = base - th['weights']
    select = method.selects if isinstance(method, LinearMethod) else decoder_linears # HalfWeights: the block Linears
    n = sum(o * i for _, o, i in targets(lms['float32'].model, select))
    assert saved['float32'] - saved['bfloat16'] == 2 * n # each selected value: 4 bytes left in float32, 2 in bf16

def test_rtn_bytes_in_bfloat16_match_the_theory():
    lm = tiny_lm('llama', hidden=128, heads=2, kv_heads=1, dtype='bfloat16'); base = weight_bytes(lm.model)
    method = CONCRETE['RTN'](bits=4)
    with method.apply(lm): held = weight_bytes(lm.model)
    assert held < base and abs(method.theory(lm, dict(weights=base, kv=0))['weights'] - held) <= 16
