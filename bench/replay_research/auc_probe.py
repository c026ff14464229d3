"""Stage-0 / stage-1 scorer quality (AUC) per model: train CV vs test."""
import sys; sys.path.insert(0, '/work/main/bench/replay_research')
from common import *
name = sys.argv[1]
hd = int(sys.argv[2]) if len(sys.argv) > 2 else 256
b = Bench(name, spec=FeatureSpec(hash_dim=hd), l2=float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
for m in b.models:
    t=time.time()
    cv = b.cv_scores((m,)); te = b.test_scores((m,))
    print(f"{m:40s} acc_tr={b.y['train'][m].mean():.3f} cvAUC={auc(cv,b.y['train'][m]):.3f} testAUC={auc(te,b.y['test'][m]):.3f}  {time.time()-t:.1f}s", flush=True)
