"""The gradient engine as objects: a run hands back its result and leaves the caller's model as it was; a tied
embedding's cross term needs backward to reach the LM head first, and a run that breaks that order stops."""
import pytest
import torch

from safedata import data as D
from safedata.features import gradients as G
from safedata.models import load_model, make_tiny_model

ITEMS = [D.Encoded(0, "p", [1, 50, 60, 70, 80], [-100, -100, 60, 70, 80]),
         D.Encoded(1, "q", [1, 90, 91, 92], [-100, -100, 91, 92])]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tied") / "model", hidden_size=16, num_layers=1, num_heads=2,
                           vocab_size=512, seed=1, tie_word_embeddings=True)
    model, tok = load_model(str(path), "fp64", "cpu")
    return model, D.pad_token_id(tok)


class HeadAfterEmbedding(G.ScoreAccumulator):
    """Hands the LM head's layer over only after the input embedding's: the order backward never takes."""

    def linear(self, site, layer_input, g, mask):
        if site.head:
            self.head = (site, layer_input, g, mask)
        else:
            super().linear(site, layer_input, g, mask)

    def embedding(self, site, token_ids, g, mask):
        super().embedding(site, token_ids, g, mask)
        super().linear(*self.head)


class NoEmbedding(G.ScoreAccumulator):
    """Never hands the input embedding's layer over: the head's half of the cross term is left unused."""

    def embedding(self, site, token_ids, g, mask):
        pass


def test_a_run_returns_its_result_and_leaves_the_model_as_it_was(tied):
    model, pad = tied
    engine = G.get_engine(model)
    assert engine.tied == "model.embed_tokens.weight"
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(flags.values())                                     # a loaded model: every weight trainable
    result = engine.run(ITEMS, pad, G.ScoreAccumulator(G.TargetBank([], engine)))
    assert isinstance(result.output, G.Products) and result.output.sqnorm.shape == (2,)
    assert result.n_supervised.tolist() == [3, 2] and result.loss.shape == (2,)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # the same numbers through score_batch, and again: nothing of one batch is kept for the next
    for _ in range(2):
        scores = G.score_batch(engine, G.TargetBank([], engine), ITEMS, pad)
        assert torch.equal(scores.sqnorm, result.output.sqnorm) and torch.equal(scores.loss, result.loss)


def test_tied_head_must_come_before_the_embedding(tied):
    model, pad = tied
    engine = G.get_engine(model)
    with pytest.raises(AssertionError, match="backward reached the input embedding before the LM head"):
        engine.run(ITEMS, pad, HeadAfterEmbedding(G.TargetBank([], engine)))
    with pytest.raises(AssertionError, match="at the end of the batch: head kept"):
        engine.run(ITEMS, pad, NoEmbedding(G.TargetBank([], engine)))
    # the engine and the model are usable afterwards: the hooks are gone, the flags restored
    assert all(p.requires_grad for p in model.parameters())
    assert G.score_batch(engine, G.TargetBank([], engine), ITEMS, pad).sqnorm.shape == (2,)


def test_score_batch_refuses_a_bank_made_for_other_settings(tied):
    model, pad = tied
    bank = G.TargetBank([], G.get_engine(model, "linear"))
    with pytest.raises(ValueError, match="made for another model or settings"):
        G.score_batch(G.get_engine(model, "all"), bank, ITEMS, pad)


def test_the_projector_interface_declares_what_the_engine_calls():
    import ast
    import inspect

    from safedata.features.gradients.accumulators import ProjectAccumulator
    from safedata.features.projection import FactoredProjector, Projector
    tree = ast.parse(inspect.getsource(ProjectAccumulator))
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Attribute) and n.value.attr == "_projector"}
    assert called == {"project_dense", "project_linear", "project_embedding", "project"}
    assert called <= Projector.__abstractmethods__
    assert not FactoredProjector.__abstractmethods__                # the implementation has every one
