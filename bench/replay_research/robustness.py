"""Split robustness at the default settings (z=1): routerbench with train/test swapped, gsm8k with
5 different hash salts, plus the shipped split. Prints test quality_vs_best / savings / reach."""
import sys, dataclasses, hashlib
sys.path.insert(0, '/work/main')
from app.replay.dataset import load_dataset, Dataset
from app.learning.train import fit_cascade
from app.replay.simulate import simulate, replay_report
P = {'winogrande': '/work/shared/data/routerbench/winogrande.jsonl', 'mbpp': '/work/shared/data/routerbench/mbpp.jsonl',
     'gsm8k': '/work/shared/data/routellm/gsm8k.jsonl'}

def resplit(ds, fn):
    rows = [dataclasses.replace(r, split=fn(r)) for r in ds.rows]
    return Dataset(ds.name, rows, ds.models)

def salt(s):
    return lambda r: 'test' if hashlib.sha256((s + r.id).encode()).digest()[0] < 128 else 'train'

def go(tag, ds):
    f = fit_cascade(ds.train, ds.models, target_quality=0.95, margin_z=1.0)
    rep = replay_report(ds, f)
    dom = [m for m, v in rep['single_models'].items() if v['cost_usd'] <= rep['cost_usd'] and v['accuracy'] > rep['accuracy'] + 1e-9]
    print(f"{tag:28s} {'->'.join(m.split('/')[-1][:14] for m in f.models):50s} q_vs_best={rep['quality_vs_best']:.3f} save={rep['savings_vs_best']:+.3f} reach={[round(x,3) for x in rep['escalation_rate']]} best={rep['best_single']['model'].split('/')[-1]} dominated={dom}", flush=True)

which = sys.argv[1:] or ['gsm8k', 'winogrande', 'mbpp']
for name in which:
    ds = load_dataset(P[name])
    if name == 'gsm8k':
        for s in ['a', 'b', 'c', 'd', 'e']:
            go(f'gsm8k salt={s}', resplit(ds, salt(s)))
    else:
        go(f'{name} swapped', resplit(ds, lambda r: 'test' if r.split == 'train' else 'train'))
        for s in ['a', 'b', 'c']:
            go(f'{name} salt={s}', resplit(ds, salt(s)))
