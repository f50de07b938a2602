"Fast checks of workbench.encoders; the slow ones load the real models."
import importlib.util
import numpy as np, pytest, torch
from workbench.core import LM, WorkbenchError
from workbench.encoders import (EmbeddingFidelity, LinearProbe, fashion_subset, halves, paragraphs, retrieval_top1,
                                vit_inputs, write_npz, FASHION_FILE)
from workbench.models import file_sha256

def test_fashion_subset_balanced():
    x, y = fashion_subset('train')
    assert x.shape == (1000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [100] * 10
    assert np.bincount(fashion_subset('test', 100)[1]).tolist() == [10] * 10

def test_subset_hash_in_provenance():
    assert file_sha256(FASHION_FILE) in (FASHION_FILE.parent / 'PROVENANCE.md').read_text()

def test_write_npz_is_deterministic(tmp_path):
    a = {'x': np.arange(12, dtype=np.uint8).reshape(3, 4), 'y': np.arange(3)}
    write_npz(tmp_path / 'a.npz', **a); write_npz(tmp_path / 'b.npz', **a)
    assert (tmp_path / 'a.npz').read_bytes() == (tmp_path / 'b.npz').read_bytes()
    with np.load(tmp_path / 'a.npz') as z: assert (z['x'] == a['x']).all()

def test_vit_inputs():
    px = vit_inputs(np.zeros((2, 28, 28), np.uint8), size=112)
    assert px.shape == (2, 3, 112, 112)
    assert torch.allclose(px[:, 1], torch.full((2, 112, 112), -0.456 / 0.224))
    with pytest.raises(WorkbenchError, match='multiple of 14'): vit_inputs(np.zeros((1, 28, 28), np.uint8), size=100)

def test_paragraphs_and_retrieval():
    ps = paragraphs(50)
    assert len(ps) == 50 and all(len(p) >= 200 for p in ps)
    assert ' '.join(halves(ps[3])) == ps[3]
    e = torch.eye(4)
    assert retrieval_top1(e, e) == 1.0 and retrieval_top1(e, e.flip(0)) == 0.0

def test_wrong_kind_and_bad_knobs():
    with pytest.raises(WorkbenchError, match="needs a model of kind vit"): LinearProbe().check(LM(model=None, name='m', kind='encoder'))
    with pytest.raises(WorkbenchError, match="needs a model of kind encoder"): EmbeddingFidelity().check(LM(model=None, name='m', kind='vit'))
    with pytest.raises(WorkbenchError, match='n_test=900 is out of range'): LinearProbe(n_test=900)
    with pytest.raises(WorkbenchError, match="unknown pool 'max'"): LinearProbe(pool='max')
    assert LinearProbe(n_train=20).describe()['n_train'] == 20

@pytest.mark.slow
def test_dinov2_matches_onnxruntime():
    pytest.importorskip('onnxruntime')
    from workbench.encoders import load_dinov2, onnx_last_hidden
    from workbench.models import model_spec, weights_path
    path = weights_path(model_spec('dinov2-s14'))
    model, px = load_dinov2(path), vit_inputs(fashion_subset('test', 2)[0])
    with torch.inference_mode(): h = model(pixel_values=px).last_hidden_state.numpy()
    assert np.abs(h - onnx_last_hidden(path, px)).max() < 1e-4

@pytest.mark.slow
def test_linear_probe_small():
    from workbench.models import load
    lm, task = load('dinov2-s14'), LinearProbe(n_train=30, n_test=20, size=112)
    r = task.run(lm, task.reference(lm))
    assert r['probe_acc'] == r['probe_acc_baseline'] and abs(r['feature_cosine'] - 1) < 1e-5
    assert r['ledger_tokens'] == 65

@pytest.mark.slow
def test_embedding_fidelity_minilm():
    from workbench.models import load
    lm, task = load('minilm-l6'), EmbeddingFidelity(n=50)
    r = task.run(lm, task.reference(lm))
    assert abs(r['emb_cosine'] - 1) < 1e-6 and r['retrieval_top1'] == r['retrieval_top1_baseline'] > 5 / 50 # chance: 1/50
