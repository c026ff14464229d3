import sys; sys.path.insert(0, '/work/main/bench/replay_research')
from common import *
for hd, ha, hp, l2 in [(64,True,False,30),(64,True,False,100),(256,True,False,300),(64,False,True,100)]:
    b = Bench('gsm8k', spec=FeatureSpec(hash_dim=hd, hash_answer=ha, hash_prompt=hp), l2=l2)
    M, G = b.models
    out=[]
    for split, s in (('train', b.cv_scores((M,))), ('test', b.test_scores((M,)))):
        y0, y1 = b.y[split][M], b.y[split][G]
        r=[np.where(s >= np.quantile(s, esc), y0, y1).mean()/y1.mean() for esc in (0.4,0.45)]
        out.append(f'{split} AUC={auc(s,y0):.3f} rel@40={r[0]:.3f} rel@45={r[1]:.3f}')
    print(hd,ha,hp,l2,' | '.join(out), flush=True)
