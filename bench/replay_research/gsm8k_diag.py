import sys; sys.path.insert(0, '/work/main/bench/replay_research')
from common import *
b = Bench('gsm8k', spec=FeatureSpec(hash_dim=0), l2=10)
M, G = b.models
mdl = b.fit((M,))
for n, c in mdl.top_features(25): print(f'{n:28s} {c:+.3f}')
X = b.feats('train', (M,)); y = b.y['train'][M]
names = feature_names(b.spec)
for i, n in enumerate(names):
    col = X[:, i]
    if col.std() == 0: continue
    print(f'{n:28s} mean={col.mean():.3f}  corr={np.corrcoef(col, y)[0,1]:+.3f}')
s = b.cv_scores((M,))
idx = np.argsort(-s)
k = 0
for i in idx:
    if y[i] == 0 and k < 8:
        k += 1
        r = b.tr[i]
        print('=====', round(s[i],3), r.reference if False else '', 'ref_final?')
        print(r.prompt[:400]); print('--- answer:'); print(r.answers[M].answer[:1200])
