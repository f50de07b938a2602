"The GPU check where CUDA exists: each family's methods on tiny configs match the CPU, bytes included."
import pytest, torch
from workbench.cli import bench_gpu

@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA on this machine: the GPU check runs only where it is')
def test_gpu_matches_cpu():
    rows = bench_gpu('cuda', lengths=(4096,))
    checked = rows[rows.check != 'flex']
    assert checked.ok.all(), checked[~checked.ok].to_string()
