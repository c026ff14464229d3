"""End-to-end with the product modules: fit_cascade on train, simulate on test, print the report.

usage: pipeline.py DATASET [--z 1.0] [--target 0.95] [--order cost] [--out DIR]
"""
import argparse, json, sys, time
sys.path.insert(0, '/work/main')
from app.replay.dataset import load_dataset
from app.learning.train import fit_cascade
from app.replay.simulate import simulate, replay_report
P = {'winogrande': '/work/shared/data/routerbench/winogrande.jsonl', 'mbpp': '/work/shared/data/routerbench/mbpp.jsonl',
     'gsm8k': '/work/shared/data/routellm/gsm8k.jsonl'}
ap = argparse.ArgumentParser(); ap.add_argument('dataset'); ap.add_argument('--z', type=float, default=1.0)
ap.add_argument('--target', type=float, default=0.95); ap.add_argument('--order', default='cost'); ap.add_argument('--out')
ap.add_argument('--l2', type=float, default=10.0)
a = ap.parse_args()
ds = load_dataset(P.get(a.dataset, a.dataset))
t = time.time()
f = fit_cascade(ds.train, ds.models, target_quality=a.target, margin_z=a.z, order=a.order, l2=a.l2)
fit_s = time.time() - t
t = time.time(); run = simulate(f, ds.test); sim_s = time.time() - t
rep = replay_report(ds, f, run)
tr = f.train
print(f"{ds.name}: fit {fit_s:.1f}s simulate {sim_s:.1f}s  chain={' -> '.join(f.models)} thresholds={[round(x,4) for x in f.thresholds]} feasible={f.feasible}")
print(f"  train: acc={tr['quality']:.4f}±{tr['quality_se']:.4f} target={f.target_quality:.4f} cost={tr['cost_usd']:.3e} best={tr['best_single']} {tr['best_single_quality']:.4f} {tr['best_single_cost_usd']:.3e} save={1-tr['cost_usd']/tr['best_single_cost_usd']:.3f} reach={[round(x,3) for x in tr['reach']]}")
bs = rep['best_single']
dom = [m for m, v in rep['single_models'].items() if v['cost_usd'] <= rep['cost_usd'] and v['accuracy'] > rep['accuracy'] + 1e-9]
print(f"  test : acc={rep['accuracy']:.4f} cost={rep['cost_usd']:.3e} best={bs['model']} {bs['accuracy']:.4f} {bs['cost_usd']:.3e} save={rep['savings_vs_best']:.3f} q_vs_best={rep['quality_vs_best']:.3f} reach={[round(x,3) for x in rep['escalation_rate']]} oracle={rep['oracle']['accuracy']:.4f}/{rep['oracle']['cost_usd']:.3e} dominated_by={dom}")
if a.out:
    f.save(a.out); json.dump(rep, open(a.out + '/report.json', 'w'), indent=1)
