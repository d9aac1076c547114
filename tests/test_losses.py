"""Losses of docs/method.md §3 against independent re-computation on a tiny random Llama."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blurctl.models import frozen_copy, token_logprobs
from blurctl.recipe import AlgorithmConfig
from blurctl.unlearn.losses import LossContext, ga, gdr, klr, npo, simnpo


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def batch():
    ids = torch.tensor([[1, 5, 9, 12, 7, 3], [1, 8, 4, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def seq_logprob_by_hand(model, batch, row):
    n = int(batch["attention_mask"][row].sum())
    ids = batch["input_ids"][row:row + 1, :n]
    logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(logp[t, ids[0, t + 1]].item() for t in range(n - 1)), n - 1


def test_token_logprobs_skip_padding(batch, model):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = token_logprobs(logits, batch["labels"])
    assert mask.sum().item() == 5 + 2
    assert (logp[~mask] == 0).all()


def test_ga_is_negated_hf_loss_and_gdr_is_hf_loss(model, batch):
    ref_loss = model(**batch).loss.item()
    assert gdr(model, None, batch, LossContext(AlgorithmConfig())).item() == pytest.approx(ref_loss, rel=1e-5)
    assert ga(model, None, batch, LossContext(AlgorithmConfig())).item() == pytest.approx(-ref_loss, rel=1e-5)


def test_npo_is_sequence_level(model, batch):
    cfg = AlgorithmConfig(beta=0.5)
    ctx = LossContext(cfg)
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = npo(model, ref, batch, ctx).item()
    terms = []
    for row in range(2):
        lp, _ = seq_logprob_by_hand(model, batch, row)
        lr, _ = seq_logprob_by_hand(ref, batch, row)
        terms.append(math.log(1 / (1 + math.exp(cfg.beta * (lp - lr)))))
    assert got == pytest.approx(-(2 / cfg.beta) * sum(terms) / 2, rel=1e-4)


def test_npo_equals_2_over_beta_log2_at_reference(model, batch):
    cfg = AlgorithmConfig(beta=0.1)
    ctx = LossContext(cfg)
    got = npo(model, frozen_copy(model), batch, ctx).item()
    assert got == pytest.approx((2 / 0.1) * math.log(2), rel=1e-5)


def test_simnpo_uses_length_normalised_logprob(model, batch):
    cfg = AlgorithmConfig(beta=2.0, delta=0.3)
    ctx = LossContext(cfg)
    got = simnpo(model, None, batch, ctx).item()
    terms = []
    for row in range(2):
        lp, n = seq_logprob_by_hand(model, batch, row)
        z = -(cfg.beta / n) * lp - cfg.delta
        terms.append(-math.log1p(math.exp(-z)))
    assert got == pytest.approx(-(2 / cfg.beta) * sum(terms) / 2, rel=1e-4)


def test_klr_is_zero_at_reference_and_matches_by_hand_kl(model, batch):
    assert klr(model, frozen_copy(model), batch, LossContext(AlgorithmConfig())).item() == pytest.approx(0, abs=1e-6)
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    got = klr(model, ref, batch, LossContext(AlgorithmConfig())).item()
    kls = []
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row:row + 1, :n]
        p = torch.softmax(ref(input_ids=ids).logits[0, : n - 1].double(), -1)
        q = torch.softmax(model(input_ids=ids).logits[0, : n - 1].double(), -1)
        kls += (p * (p.log() - q.log())).sum(-1).tolist()
    assert got > 0
    assert got == pytest.approx(sum(kls) / len(kls), rel=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_rmu_reads_the_decoder_layer_output_itself(model, batch, layer):
    """RMU's activations are the output of decoder layer l (as the WMDP code hooks it):
    at the last layer that is *before* the final norm, unlike ``hidden_states[-1]``."""
    import copy

    from blurctl.recipe import SteeringConfig
    from blurctl.unlearn.losses import rmu_forget

    control = torch.rand(32, generator=torch.Generator().manual_seed(3))
    control /= control.norm()
    ctx = LossContext(AlgorithmConfig(), SteeringConfig(layer=layer, update_layers=[layer]),
                      control, 6.5)
    got = rmu_forget(model, None, batch, ctx).item()

    def mse_at(m, index):
        states = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        return ((states[index].double() - 6.5 * control) ** 2).mean(-1)[mask].mean().item()

    no_final_norm = copy.deepcopy(model)
    no_final_norm.model.norm = torch.nn.Identity()  # hidden_states[l + 1] is then layer l's output
    assert got == pytest.approx(mse_at(no_final_norm, layer + 1), rel=1e-5)
    if layer == model.config.num_hidden_layers - 1:
        assert got != pytest.approx(mse_at(model, -1), rel=1e-2)  # not after the final norm
