"An interrupted study, rerun, recomputes none of its finished rows and loses none."
import signal, subprocess, sys, time

SCRIPT = '''
import sys
from workbench.study import Study, grid
from workbench.methods import LocalWindow
from workbench.tasks import Perplexity
s = Study('smollm2-135m', grid(LocalWindow, window=list(range(8, 80, 8))), Perplexity(tokens=256, window=256),
          name='kill', root=sys.argv[1])
df = s.run(progress=False)
print('computed', s.computed, 'rows', len(df))
'''

def test_killed_study_resumes(tmp_path):
    rows = tmp_path/'kill'
    p = subprocess.Popen([sys.executable, '-c', SCRIPT, str(tmp_path)])
    t0 = time.time()
    while len(list(rows.glob('*.json'))) < 3 and time.time() - t0 < 300: time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    done = len(list(rows.glob('*.json')))
    assert 3 <= done < 10, done # killed mid-sweep
    out = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert f'computed {10 - done} rows 10' in out, out
    assert len(list(rows.glob('*.json'))) == 10
    assert not list(rows.glob('*.tmp'))
