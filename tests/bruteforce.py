"""The brute-force gradient reference shared by the tests (tests/test_gradients.py, tests/test_recipes.py):
fp64, one example at a time (batch size 1, no padding), the full gradient vector from torch.autograd.grad.
Nothing of safedata.features.gradients is used; only the tokenisation (safedata.data.encode, tested on its
own in tests/test_data.py and tests/test_multiturn.py) is shared with the code under test."""
import torch

from safedata import data as D
from safedata.features.runner import prepare_data
from safedata.models import load_model


def flat_grad(model, item, names):
    """The full gradient of one example's mean token loss, over `names`, by plain autograd (batch of 1)."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]
    for p in ps:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1].double()
        labels = torch.tensor(item.labels)[1:]
        keep = labels != D.IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep])   # mean over supervised tokens
        grads = torch.autograd.grad(loss, ps)
    finally:
        for p in ps:
            p.requires_grad_(False)
    return torch.cat([g.reshape(-1) for g in grads])


def mean_unit(grads):
    """The paper's target: the mean of the anchors' unit gradients."""
    return (grads / grads.norm(dim=1, keepdim=True)).mean(0)


class Reference:
    """Gradient scores by brute force: s_ij = <G_i, T_j> / ||G_i||, G_i the pool example's full gradient,
    T_j = mean_unit(anchor gradients of anchor file j).

    pool, anchors: data files (anchors: a list, one target each); max_length / anchor_max_length cut the pool /
    anchor examples, max_response_length keeps the anchors' first response tokens (as the stages' flags do).
    model: use this (fp64) model instead of loading model_dir's."""

    def __init__(self, model_dir, pool, anchors, max_response_length=None, names_filter=None, model=None,
                 max_length=None, anchor_max_length=None, template="paper"):
        self.model, self.tok = load_model(model_dir, "fp64", "cpu")
        if model is not None:
            self.model = model
        self.pad = D.pad_token_id(self.tok)
        self.pool = prepare_data(pool, self.tok, template, max_length=max_length)
        self.anchors = [prepare_data(path, self.tok, template, max_length=anchor_max_length,
                                     max_response_length=max_response_length) for path in anchors]
        self.names = [n for n, _ in self.model.named_parameters() if names_filter is None or names_filter(n)]
        self.gp = self.gradients(self.pool.encoded)                                    # [N, P]
        self.T = torch.stack([mean_unit(self.gradients(a.encoded)) for a in self.anchors])  # [targets, P]
        self.inner = self.gp @ self.T.T                                                # [N, targets]
        self.sq = (self.gp * self.gp).sum(1)
        self.scores = self.inner / self.sq.sqrt()[:, None]

    def gradients(self, items):
        return torch.stack([flat_grad(self.model, item, self.names) for item in items])

    @property
    def a(self):
        return self.anchors[0]

    @property
    def b(self):
        return self.anchors[1]
