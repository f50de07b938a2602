"""Our HQQ against the hqq library on SmolLM2's layers: per-layer relative weight error within 2% of the library's (a
subset fast, all 210 layers slow), and `HQQVariant` equal, bit for bit, to our HQQ with its defaults and to the library
with `library_ingredients`."""
import pytest, torch
from workbench.core import WorkbenchError
from workbench.quant.methods import HQQ, RTN, QuantLinear, in_blocks, targets
from workbench.quant.peers import HQQVariant, hqq_layer_errors, library_ingredients, peers_available

needs_hqq = pytest.mark.skipif(not peers_available()['hqq'],
                               reason='the hqq library is not installed (pip install hqq)')

@pytest.fixture(scope='module')
def lm():
    from workbench.models import load
    torch.set_num_threads(1) # HQQ's loops of small operations run on one thread anyway
    return load('smollm2-135m')

def subset(lm, every=10): return [n for n, o, i in targets(lm.model, in_blocks)][::every]

def check_errors(t):
    "Median and maximum of (ours / library - 1) of the relative weight error within 2%, printed for the report."
    med, mx, mn = t.ratio_minus_1.median(), t.ratio_minus_1.max(), t.ratio_minus_1.min()
    print(f"{t.bits.iloc[0]} bits, {len(t)} layers: ours / library - 1: "
          f"median {med:+.4%}, max {mx:+.4%}, min {mn:+.4%}")
    assert abs(med) <= 0.02 and mx <= 0.02, (med, mx)
    assert t.variant_is_library.all(), t.layer[~t.variant_is_library].tolist()

@needs_hqq
@pytest.mark.parametrize('bits', [3, 4])
def test_layer_errors_subset(lm, bits):
    "Every 10th quantized layer (21 of 210), g64."
    t = hqq_layer_errors(lm, bits, every=10)
    assert len(t) == 21
    check_errors(t)

@needs_hqq
@pytest.mark.slow
@pytest.mark.parametrize('bits', [3, 4])
def test_layer_errors_all(lm, bits):
    "All 210 quantized Linear layers, g64."
    t = hqq_layer_errors(lm, bits)
    assert len(t) == 210
    check_errors(t)

@pytest.mark.parametrize('bits', [3, 4])
def test_variant_defaults_are_ours(lm, bits):
    "With its defaults HQQVariant is our HQQ (and with zero_init='rounded' our HQQ with that knob), bit for bit."
    for n in subset(lm, 30):
        w = lm.model.get_submodule(n).weight
        for kw in ({}, {'zero_init': 'rounded'}):
            ours = HQQ(bits=bits, group_size=64, **kw).fake_quant(w)
            assert torch.equal(HQQVariant(bits=bits, group_size=64, **kw).fake_quant(w), ours), (n, kw)

def test_variant_one_iteration_is_rtn(lm):
    w = lm.model.model.layers[7].mlp.down_proj.weight
    rtn = RTN(bits=3, group_size=64).fake_quant(w)
    assert torch.equal(HQQVariant(bits=3, group_size=64, iters=1).fake_quant(w), rtn)

def test_rounded_zero_packed_is_fake_quant(lm):
    "HQQ(zero_init='rounded') stores in QuantLinear what its fake-quant computes, with 0 on each group's grid."
    lin = lm.model.model.layers[12].self_attn.v_proj
    m = HQQ(bits=3, group_size=64, zero_init='rounded', iters=1)
    q = m.quantize(lin.weight)
    assert torch.equal(QuantLinear(lin, q).dequantize(), m.fake_quant(lin.weight))
    steps = q.offset.float() / q.scale.float()
    assert (steps - steps.round()).abs().max() < 1e-2 # a whole number of steps (up to its fp16 rounding)
    plain = HQQ(bits=3, group_size=64, iters=1).quantize(lin.weight)
    s2 = plain.offset.float() / plain.scale.float()
    assert (s2 - s2.round()).abs().max() > 0.4 # the group minimum is not

@needs_hqq
@pytest.mark.parametrize('bits', [3, 4])
def test_library_ingredients_are_the_library(lm, bits):
    from workbench.quant.peers import hqq_library_linear
    for n in subset(lm, 30):
        lin = lm.model.get_submodule(n)
        lib = hqq_library_linear(lin, bits, 64).dequantize().float()
        mimic = HQQVariant(bits=bits, group_size=64, **library_ingredients(bits)).fake_quant(lin.weight)
        assert torch.equal(mimic, lib), n

def test_variant_bad_settings():
    with pytest.raises(WorkbenchError, match="needs granularity='group'"): HQQVariant(granularity='channel')
    with pytest.raises(WorkbenchError, match='to divide the 40 inputs'):
        HQQVariant(group_size=16).fake_quant(torch.randn(4, 40))
    with pytest.raises(WorkbenchError, match='symmetric=True is not valid'): HQQVariant(symmetric=True)
