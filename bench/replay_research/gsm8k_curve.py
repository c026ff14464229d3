import sys; sys.path.insert(0, '/work/main/bench/replay_research')
from common import *
hd = int(sys.argv[1]); l2 = float(sys.argv[2])
b = Bench('gsm8k', spec=FeatureSpec(hash_dim=hd), l2=l2)
M, G = b.models
for split, s in (('train', b.cv_scores((M,))), ('test', b.test_scores((M,)))):
    y0, y1 = b.y[split][M], b.y[split][G]
    print(split, 'n', len(y0), 'AUC', round(auc(s, y0),3), 'GPT4', y1.mean().round(4), 'target', (0.95*y1.mean()).round(4))
    for esc in (0.3, 0.4, 0.45, 0.5):
        t = np.quantile(s, esc)
        acc = np.where(s >= t, y0, y1).mean()
        print(f'  esc={esc:.2f} acc={acc:.4f} rel={acc/y1.mean():.4f}')
