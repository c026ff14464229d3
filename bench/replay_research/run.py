"""FrugalGPT-style search on train (cross-fitted scores), evaluation on test.

usage: run.py DATASET [--scorer lr|agree|lrhash] [--order cost|any] [--margin 0.0] [--rel 0.95] [--l2 10]
"""
import argparse, json, sys; sys.path.insert(0, '/work/main/bench/replay_research')
from common import *

ap = argparse.ArgumentParser()
ap.add_argument('dataset'); ap.add_argument('--scorer', default='lr'); ap.add_argument('--order', default='cost')
ap.add_argument('--margin', type=float, default=0.0); ap.add_argument('--rel', type=float, default=0.95)
ap.add_argument('--l2', type=float, default=10.0); ap.add_argument('--hash', type=int, default=0)
ap.add_argument('--max-stages', type=int, default=3); ap.add_argument('--models', default='')
ap.add_argument('--top', type=int, default=8); ap.add_argument('--fit', default='oof')
a = ap.parse_args()
b = Bench(a.dataset, spec=FeatureSpec(hash_dim=a.hash), l2=a.l2)
models = [m for m in b.models if not a.models or m in a.models.split(',')]
AGREE = ENGINEERED_NAMES.index('agree_prev')

def agree_scores(split, chain):
    if len(chain) == 1: return np.full(len(b.y[split][chain[0]]), 0.5)
    return b.feats(split, chain)[:, AGREE]

def insample(chain):
    mdl = b.fit(chain); return np.array(mdl.predict_proba_many(b.feats('train', chain).tolist()))
def score_train(chain):
    if a.scorer == 'agree': return agree_scores('train', chain)
    return b.cv_scores(chain) if a.fit == 'oof' else insample(chain)
def score_test(chain):
    return agree_scores('test', chain) if a.scorer == 'agree' else b.test_scores(chain)

res = {}
for split in ('train', 'test'):
    rows = b.tr if split == 'train' else b.te
    summ = model_summary(rows, models); bs = best_single(summ)
    orc = oracle(rows, models)
    res[split] = (summ, bs, orc)
    print(f"[{split}] n={len(rows)} best single {bs} acc={summ[bs].accuracy:.4f} cost={summ[bs].mean_cost_usd:.3e}  oracle acc={orc.accuracy:.4f} cost={orc.mean_cost_usd:.3e}")
summ, bs, _ = res['train']
target = a.rel * summ[bs].accuracy + a.margin
t0 = time.time()
sr = search_cascades(models, b.y['train'], b.c['train'], score_train, target, max_stages=a.max_stages, order=a.order)
print(f"search {len(sr.candidates)} chains in {time.time()-t0:.1f}s, target(train)={target:.4f}")
cands = sorted([c for c in sr.candidates if c.feasible], key=lambda c: c.cost)[:a.top]
tsumm, tbs, torc = res['test']
for rank, c in enumerate(cands):
    K = len(c.models)
    S = np.stack([score_test(c.models[:j+1]) for j in range(K-1)] + [np.zeros(len(b.te))], axis=1)
    C = np.stack([b.y['test'][m] for m in c.models], 1); Co = np.stack([b.c['test'][m] for m in c.models], 1)
    e = evaluate_cascade(S, C, Co, c.thresholds)
    ok = e.quality >= 0.95 * tsumm[tbs].accuracy
    dom = [m for m, v in tsumm.items() if v.mean_cost_usd <= e.cost and v.accuracy > e.quality + 1e-9]
    print(f"#{rank} {' -> '.join(c.models)} th={[round(t,3) for t in c.thresholds]}\n"
          f"    train acc={c.quality:.4f} cost={c.cost:.3e} save={1-c.cost/summ[bs].mean_cost_usd:.3f} reach={[round(x,3) for x in c.reach]}\n"
          f"    test  acc={e.quality:.4f} ({e.quality/tsumm[tbs].accuracy:.3f} of best) cost={e.cost:.3e} save={1-e.cost/tsumm[tbs].mean_cost_usd:.3f} reach={[round(x,3) for x in e.reach]} {'OK' if ok else 'MISS'} dominated_by={dom}")
