import pytest
import torch

from multitoken.config import ModelConfig, param_count
from multitoken.errors import UserError
from multitoken.head_kinds import HEAD_KINDS, HeadKind, head_kind
from multitoken.model import MultiTokenModel
from tests import test_loss, test_model
from tests.generate import test_speculative


@pytest.mark.parametrize(
    "name, order_all, order_first, sources",
    [
        ("parallel", [0, 1, 2, 3], [0], [None, None, None, None]),
        ("linear", [0, 1, 2, 3], [0], [None, None, None, None]),
        ("causal", [0, 1, 2, 3], [0], [None, 0, 1, 2]),
        ("anticausal", [3, 2, 1, 0], [3, 2, 1, 0], [1, 2, 3, None]),
        ("mtp", [0, 1, 2, 3], [0], [None, 0, 1, 2]),
    ],
)
def test_each_kind_runs_and_feeds_its_heads_as_the_paper_describes(name, order_all, order_first, sources):
    kind = head_kind(name)
    assert kind.order(4, [0, 1, 2, 3]) == order_all and kind.order(4, [0]) == order_first
    assert [kind.source(i, 4) for i in range(4)] == sources
    assert kind.chained == any(s is not None for s in sources)


def test_an_unknown_kind_is_a_user_error_naming_the_known_ones():
    with pytest.raises(UserError, match="parallel, causal, anticausal, linear"):
        ModelConfig(vocab_size=8, dim=16, n_layers=3, n_heads=2, n_future=2, head_type="bogus")


def test_token_conditioned_modules_count_their_parameters_and_read_tokens_ahead():
    cfg = ModelConfig(vocab_size=31, dim=32, n_layers=6, n_heads=4, n_future=4, max_seq_len=64, head_type="mtp")
    model = MultiTokenModel(cfg)
    assert model.num_parameters() == param_count(cfg) and cfg.n_trunk_layers == 2
    assert [cfg.head_kind.token_lead(i) for i in range(4)] == [None, 1, 2, 3]
    with pytest.raises(ValueError, match="reads the token 1 positions ahead"):
        model.run_heads(torch.zeros(1, 5, 32), model.attention_context(5))  # no tokens given


class SkipHeads(HeadKind):
    """A kind written for this test: head i reads head i-2's output (heads 0 and 1 read the trunk)."""

    name = "skip"
    chained = True
    independent = False
    official_layout = False

    def order(self, n_future, wanted):
        return list(range(max(wanted) + 1))

    def source(self, i, n_future):
        return i - 2 if i >= 2 else None


def test_a_new_kind_is_one_class_and_every_oracle_holds_for_it(monkeypatch):
    # Registered, it builds and counts its parameters, and the library's oracles hold for it unchanged: the
    # memory-efficient step equals the summed losses, the cached forward the full one, speculative greedy
    # decoding plain decoding. Nothing else in the library names kinds.
    monkeypatch.setitem(HEAD_KINDS, "skip", SkipHeads())
    cfg = ModelConfig(vocab_size=31, dim=32, n_layers=6, n_heads=4, n_future=4, max_seq_len=64, head_type="skip")
    assert MultiTokenModel(cfg).num_parameters() == param_count(cfg)
    assert MultiTokenModel(cfg).head_order([3]) == [0, 1, 2, 3]
    test_loss.test_sequential_step_equals_summed_loss("skip", chunk=7, tie=False)
    test_model.test_cached_decoding_equals_full_forward("skip")
    test_speculative.test_chain_greedy_equals_plain_random_model("skip")
