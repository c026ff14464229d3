"""Research helpers: features per chain, cross-fitted LR scores, evaluation on test."""
from __future__ import annotations
import hashlib, math, sys, time
from functools import lru_cache
import numpy as np
sys.path.insert(0, '/work/main')
from app.replay.dataset import load_dataset, model_summary, best_single, oracle
from app.scoring.features import extract_features
from app.scoring.feature_spec import FeatureSpec, feature_names, ENGINEERED_NAMES
from app.learning.fitting import fit_logistic
from app.scoring.model import LogisticModel
from app.learning.thresholds import choose_thresholds, evaluate_cascade, search_cascades

D = '/work/shared/data/'
PATHS = {'winogrande': D+'routerbench/winogrande.jsonl', 'mbpp': D+'routerbench/mbpp.jsonl', 'gsm8k': D+'routellm/gsm8k.jsonl'}


class Bench:
    def __init__(self, name, spec=FeatureSpec(hash_dim=256), l2=1.0, folds=5, cols=None):
        self.name = name
        self.ds = load_dataset(PATHS[name])
        self.tr, self.te = self.ds.train, self.ds.test
        self.models = self.ds.models
        self.spec = spec; self.l2 = l2; self.folds = folds
        self.cols = cols  # optional feature column subset (indices)
        self._feat = {}
        self.y = {s: {m: np.array([r.answers[m].correct for r in rows], float) for m in self.models}
                  for s, rows in (('train', self.tr), ('test', self.te))}
        self.c = {s: {m: np.array([r.answers[m].cost_usd for r in rows], float) for m in self.models}
                  for s, rows in (('train', self.tr), ('test', self.te))}
        rng = np.random.default_rng(0)
        self.fold = rng.permutation(len(self.tr)) % folds

    def feats(self, split, chain):
        key = (split, chain)
        if key not in self._feat:
            rows = self.tr if split == 'train' else self.te
            m = chain[-1]
            X = np.array([extract_features(r.prompt, r.answers[m].answer, [r.answers[p].answer for p in chain[:-1]], spec=self.spec) for r in rows])
            self._feat[key] = X
        X = self._feat[key]
        return X if self.cols is None else X[:, self.cols]

    def fit(self, chain):
        X = self.feats('train', chain); y = self.y['train'][chain[-1]]
        return fit_logistic(X, y, l2=self.l2, names=[feature_names(self.spec)[i] for i in (self.cols if self.cols is not None else range(X.shape[1]))])

    def cv_scores(self, chain):
        X = self.feats('train', chain); y = self.y['train'][chain[-1]]
        out = np.zeros(len(y))
        for f in range(self.folds):
            tr = self.fold != f
            if y[tr].min() == y[tr].max():
                out[~tr] = y[tr][0]; continue
            mdl = fit_logistic(X[tr], y[tr], l2=self.l2)
            out[~tr] = mdl.predict_proba_many(X[~tr].tolist())
        return out

    def test_scores(self, chain):
        mdl = self.fit(chain)
        return np.array(mdl.predict_proba_many(self.feats('test', chain).tolist()))


def auc(s, y):
    s = np.asarray(s); y = np.asarray(y) > 0.5
    if y.all() or (~y).all(): return float('nan')
    order = np.argsort(s, kind='mergesort'); ranks = np.empty(len(s)); 
    # average ranks for ties
    from collections import defaultdict
    sv = s[order]; r = np.arange(1, len(s)+1, dtype=float)
    i = 0
    while i < len(sv):
        j = i
        while j+1 < len(sv) and sv[j+1] == sv[i]: j += 1
        r[i:j+1] = (i+1+j+1)/2; i = j+1
    ranks[order] = r
    npos = y.sum(); nneg = len(y)-npos
    return float((ranks[y].sum() - npos*(npos+1)/2) / (npos*nneg))
