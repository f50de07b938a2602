"Checks of workbench.quant.methods on tiny random models (fast) and on the real models (slow)."
import math
import pytest, torch
import torch.nn.functional as F
from torch import nn
from workbench.core import WorkbenchError, threads
from workbench.ledger import weight_bytes
from workbench.models import tiny_lm
from workbench.packing import pack, unpack
from workbench.quant.methods import (GPTQ, HQQ, KMeans, QuantLinear, PaletteLinear, RTN, gptq_quantize, groups_of)

@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models: many small operations, faster on one thread."
    with threads(1): yield

@pytest.fixture(scope='module')
def lin():
    torch.manual_seed(0); return nn.Linear(40, 24)

@pytest.mark.parametrize('bits', range(1, 9))
def test_pack_roundtrip(bits):
    for n in (1, 7, 8, 9, 1000):
        codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(n))
        p = pack(codes, bits)
        assert p.dtype == torch.uint8 and len(p) == math.ceil(n * bits / 8)
        assert torch.equal(unpack(p, bits, n=n).long(), codes)

@pytest.mark.parametrize('bits', range(1, 9))
def test_packed_linear_bytes(lin, bits):
    "A packed Linear holds exactly `bits` bits per code: its matrix is one slice of out * in codes."
    w = RTN(bits=bits, group_size=8).quantize(lin.weight)
    q = QuantLinear(lin, w)
    assert q.packed.numel() == 24 * 40 * bits // 8 and torch.equal(q.codes(), w.codes)

@pytest.mark.parametrize('bits', range(1, 9))
@pytest.mark.parametrize('gran', ['tensor', 'channel', 'group'])
def test_quantlinear_is_fake_quant_exactly(lin, bits, gran):
    x = torch.randn(3, 40)
    for sym in ([False, True] if bits > 1 else [False]):
        m = RTN(bits=bits, granularity=gran, group_size=16, symmetric=sym)
        q = m.quantize(lin.weight)
        assert q.codes.max() <= 2 ** bits - 1
        assert torch.equal(QuantLinear(lin, q)(x), F.linear(x, m.fake_quant(lin.weight), lin.bias))

def test_partial_last_group(lin):
    "40 inputs in groups of 16: groups of 16, 16 and a last partial one of 8, each with its own scale."
    q = RTN(bits=4, group_size=16).quantize(lin.weight)
    assert q.scale.shape == (24, 3)
    tail = lin.weight.detach()[:, 32:]
    assert torch.equal(q.offset[:, 2], tail.min(1).values.half())
    assert [g.shape for g in groups_of(lin.weight, 16)] == [(24, 2, 16), (24, 1, 8)]

def test_more_bits_less_error(lin):
    errs = [(RTN(bits=b, group_size=8).fake_quant(lin.weight) - lin.weight).abs().mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))

def test_hqq_not_worse_than_rtn():
    torch.manual_seed(1); w = torch.randn(64, 256) * 0.02
    e = lambda m: (m.fake_quant(w) - w).abs().mean().item()
    assert e(HQQ(bits=3, group_size=64)) <= e(RTN(bits=3, group_size=64)) * 1.001

def test_gptq_lowers_output_error():
    torch.manual_seed(2); w = torch.randn(32, 64)
    X = torch.randn(2048, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(2048, 64) # correlated inputs
    H = 2 * X.T @ X / len(X)
    m = RTN(bits=3, group_size=16)
    err = lambda wq: ((X @ (w - wq).T) ** 2).mean().item()
    assert err(gptq_quantize(m, w, H).dequantize()) < 0.7 * err(m.fake_quant(w))
    assert err(gptq_quantize(m, w, H, act_order=True).dequantize()) < 0.7 * err(m.fake_quant(w))
    for other in [RTN(bits=3, granularity='tensor'), RTN(bits=4, granularity='channel', symmetric=True),
                  RTN(bits=3, group_size=24)]:
        q = gptq_quantize(other, w, H)
        assert q.scale.shape == other.quantize(w).scale.shape and err(q.dequantize()) < err(other.fake_quant(w))

@pytest.mark.parametrize('arch', ['llama', 'gemma3', 'bert'])
def test_ledger_matches_theory_and_restores(arch):
    lm = tiny_lm(arch); x = torch.randint(0, 500, (1, 12))
    with torch.no_grad(): base = lm.model(x)[0]
    w0 = weight_bytes(lm.model)
    for m in [RTN(bits=2), RTN(bits=3, granularity='channel', symmetric=True), RTN(bits=8, granularity='tensor'),
              RTN(bits=4, group_size=48, layers='attention'), HQQ(bits=4, group_size=16, iters=3), KMeans(bits=3),
              GPTQ(bits=3, group_size=16, calib_tokens=64, calib_window=32)]:
        with m.apply(lm):
            measured = weight_bytes(lm.model)
            n_packed = sum(isinstance(q, (QuantLinear, PaletteLinear)) for q in lm.model.modules())
        assert n_packed > 0
        assert abs(measured / m.theory(lm, {'weights': w0})['weights'] - 1) < 0.01, m
    assert weight_bytes(lm.model) == w0
    with torch.no_grad(): assert torch.equal(lm.model(x)[0], base)

def test_class_tree():
    "Weight methods are `LinearMethod`s, the affine ones `AffineQuant`s; no class switches a parent's part off."
    from workbench.quant.methods import LinearMethod, AffineQuant
    from workbench.quant.study import MixedPrecision, BitStack
    from workbench.quant.peers import QuantoPeer, HQQPeer, HQQVariant
    from workbench.study import method_registry
    assert not LinearMethod.runnable() and not AffineQuant.runnable()
    assert all(issubclass(c, AffineQuant) for c in (RTN, HQQ, GPTQ, HQQVariant))
    assert all(c.__bases__ == (LinearMethod,) for c in (KMeans, MixedPrecision, BitStack, QuantoPeer, HQQPeer))
    weight = [c for c in method_registry('quant').values() if issubclass(c, LinearMethod)]
    names = {'RTN', 'HQQ', 'GPTQ', 'KMeans', 'MixedPrecision', 'BitStack', 'QuantoPeer', 'HQQPeer', 'HQQVariant'}
    assert names <= {c.__name__ for c in weight}
    for c in weight: # no stand-in attributes such as `granularity = 'group'` or `theory = None`
        assert not {'granularity', 'symmetric', 'theory'} & {k for k, v in vars(c).items() if not callable(v)}, c
    assert {c.__name__ for c in weight if 'validate' in vars(c)} == {'HQQ', 'HQQVariant'} # checks of their own only
    lm = tiny_lm('llama')
    assert QuantoPeer().theory(lm, {'weights': 1}) is None and HQQPeer().theory(lm, {'weights': 1}) is None

def test_bad_input():
    with pytest.raises(WorkbenchError, match=r'bits=9 is out of range; valid: \[1, 8\]'): RTN(bits=9)
    with pytest.raises(WorkbenchError, match=r'bits=0 is out of range'): GPTQ(bits=0)
    with pytest.raises(WorkbenchError, match='symmetric=True needs bits >= 2'): RTN(bits=1, symmetric=True)
    with pytest.raises(WorkbenchError, match='symmetric=True is not valid'): HQQ(symmetric=True)
    with pytest.raises(WorkbenchError, match='group_size=4 is out of range'): RTN(group_size=4)
    with pytest.raises(WorkbenchError, match="unknown value for knob granularity 'row'"): RTN(granularity='row')
    with pytest.raises(WorkbenchError, match='needs group_size to divide the input dimension: 40 % 16'):
        KMeans(granularity='group', group_size=16).palette(torch.randn(4, 40))
    with pytest.raises(WorkbenchError, match='GPTQ needs calibration'): GPTQ().fake_quant(torch.randn(4, 32))
    with pytest.raises(WorkbenchError, match='bits=9 is out of range'): pack(torch.zeros(8), 9)

@pytest.mark.slow
def test_q41_faithfulness_smollm2():
    "4-bit asymmetric RTN in groups of 32 reproduces SmolLM2's Q4_1 weights exactly, and the perplexity."
    from workbench.models import load
    from workbench.tasks import Perplexity
    lm = load('smollm2-135m'); m = RTN(bits=4, group_size=32)
    diffs = [(m.fake_quant(mod.weight) - mod.weight).abs().max().item()
             for n, mod in lm.model.named_modules() if m.selects(n, mod)]
    assert len(diffs) == 210 and max(diffs) == 0
    task = Perplexity(tokens=256, window=256); base = task.run(lm)['ppl']
    with m.apply(lm): assert abs(task.run(lm)['ppl'] - base) < 1e-4

@pytest.mark.slow
def test_minilm_8bit_cosine():
    from workbench.models import load
    from workbench.encoders import EmbeddingFidelity
    lm, task = load('minilm-l6'), EmbeddingFidelity(n=40)
    ref = task.reference(lm)
    with RTN(bits=8, granularity='channel').apply(lm): r = task.run(lm, ref)
    assert r['emb_cosine'] > 0.999, r

def test_allocate_and_budgets():
    from workbench.quant.study import allocate, MixedPrecision, BitStack
    s, c = {'a': {2: 1.0, 4: 0.1}, 'b': {2: 0.2, 4: 0.0}}, {'a': {2: 10, 4: 20}, 'b': {2: 10, 4: 20}}
    assert allocate(s, c, 30) == {'a': 4, 'b': 2}
    with pytest.raises(WorkbenchError, match='below the smallest representable size 20 bytes'): allocate(s, c, 19)
    lm = tiny_lm('llama')
    with pytest.raises(WorkbenchError, match='below the smallest representable size'):
        MixedPrecision(avg_bits=1.5, calib_tokens=32, group_size=16).plan(lm)
    with pytest.raises(WorkbenchError, match='below the smallest representable size'):
        BitStack(bits_per_weight=1.0, rank=1, calib_tokens=32).plan(lm)
    with pytest.raises(WorkbenchError, match='bits_per_weight=0.1 is out of range'): BitStack(bits_per_weight=0.1)

def test_mixed_and_stack_bytes():
    from workbench.quant.study import MixedPrecision, BitStack
    lm = tiny_lm('llama'); w0 = weight_bytes(lm.model)
    mp = MixedPrecision(avg_bits=3.0, group_size=16, calib_tokens=16)
    with mp.apply(lm): mixed = weight_bytes(lm.model)
    with RTN(bits=3, group_size=16).apply(lm): uniform = weight_bytes(lm.model)
    assert mixed <= uniform and mixed == mp.theory(lm, {'weights': w0})['weights']
    bs = BitStack(bits_per_weight=3.0, rank=1, calib_tokens=32)
    with bs.apply(lm): stacked = weight_bytes(lm.model)
    assert abs(stacked / bs.theory(lm, {'weights': w0})['weights'] - 1) < 0.01
    assert weight_bytes(lm.model) == w0

@pytest.mark.slow
def test_bench_quant_runs():
    from workbench.quant.study import bench, bench_matmul
    from workbench.quant.peers import QuantoPeer
    t = bench(tokens=128, window=128, methods=[RTN(bits=4, group_size=32)], progress=None)
    assert list(t.method[:2]) == ['baseline (Q4_1-dequantized)', RTN(bits=4, group_size=32).name]
    assert abs(t.ppl[1] - t.ppl[0]) < 1e-4 and abs(t.bits_per_weight[1] - 5.0) < 1e-6
    assert (bench_matmul(tokens=8, repeats=1).slowdown > 0).all()

def reference_gptq(m, w, H, damp=0.01, dtype=torch.float64):
    "The GPTQ paper's Algorithm 1, without lazy batches: one column at a time, every later column updated at once."
    W, H, n = w.detach().to(dtype).clone(), H.to(dtype).clone(), w.shape[1]
    H += damp * H.diag().mean() * torch.eye(n, dtype=dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True) # another route to the inverse than ours
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for j in range(n):
        if j % m.group_size == 0: s, o = m.stored(*m.scale_offset(W[:, None, j:j + m.group_size]))
        q = m.encode(W[:, j:j + 1], s[:, 0], o[:, 0])
        codes[:, j] = q[:, 0]
        err = (W[:, j] - (q[:, 0].to(dtype) * s[:, 0, 0].to(dtype) + o[:, 0, 0].to(dtype))) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes

@pytest.fixture(scope='module')
def smollm2_layer():
    "A real layer of SmolLM2 (block 2's MLP down projection) and the float64 Hessian of its calibration inputs."
    from workbench.models import load
    from workbench.quant.methods import calib_batches
    lm = load('smollm2-135m'); layer = lm.model.model.layers[2].mlp.down_proj; xs = []
    hook = layer.register_forward_hook(lambda mod, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad(): lm.model(**calib_batches(lm, 512, 512)[0], use_cache=False)
    hook.remove(); X = xs[0]
    return layer.weight.detach().clone(), 2 * X.T @ X / len(X)

def test_gptq_matches_reference_loop(smollm2_layer):
    """Ours (lazy blocks of 128 columns) against Algorithm 1: identical codes in float64. In float32 the codes move with
    the summation order (measured on block 2: ours differs from the float64 reference in 0.05% (q_proj) to 0.62%
    (down_proj) of codes, the paper's loop in float32 in 0.6% to 4.2%): the reason GPTQ solves in float64."""
    w, H = smollm2_layer
    m = RTN(bits=3, group_size=64)
    ref = reference_gptq(m, w, H)
    assert torch.equal(gptq_quantize(m, w, H).codes, ref)
    ours32 = (gptq_quantize(m, w, H, dtype=torch.float32).codes != ref).float().mean().item()
    assert ours32 <= 0.01, ours32
