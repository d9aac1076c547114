"""docs/method.md §2 properties of the combined direction, checked against an independent computation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blurctl.unlearn.combine import Weights, combine, combine_

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def grads(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


def unflat(v: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(v[i:i + n].view(s))
        i += n
    return out


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), w_f=st.floats(0.1, 10), w_r=st.floats(0.1, 1000))
def test_blur_matches_flat_vector_formula(seed, w_f, w_r):
    g_f, g_r = grads(seed), grads(seed + 1)
    d, stats = combine(g_f, g_r, "blur", Weights(w_f, w_r, 0.0))
    f, r = flat(g_f), flat(g_r)
    expected = w_f * f + w_r * (r - (r @ f) / (f @ f) * f)
    torch.testing.assert_close(flat(d), expected)
    assert stats.dot.item() == pytest.approx((r @ f).item())
    assert stats.forget_sq.item() == pytest.approx((f @ f).item())
    assert stats.retain_sq.item() == pytest.approx((r @ r).item())


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), w_f=st.floats(0.1, 10), w_r=st.floats(0.1, 1000))
def test_retain_part_is_orthogonal_to_forget_gradient(seed, w_f, w_r):
    g_f, g_r = grads(seed), grads(seed + 7, scale=5.0)
    d, _ = combine(g_f, g_r, "blur", Weights(w_f, w_r, 0.0))
    retain_part = flat(d) - w_f * flat(g_f)
    assert abs((retain_part @ flat(g_f)).item()) < 1e-8 * retain_part.norm() * flat(g_f).norm() + 1e-9


def test_orthogonal_gradients_reduce_to_weighted_sum():
    f = torch.zeros(20, dtype=torch.float64)
    r = torch.zeros(20, dtype=torch.float64)
    f[:10], r[10:] = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    d, stats = combine(_split(f), _split(r), "blur",
                       Weights(2.0, 3.0))
    torch.testing.assert_close(flat(d), 2.0 * f + 3.0 * r)
    assert stats.as_floats()["cosine"] == 0.0


def _split(v: torch.Tensor) -> list[torch.Tensor]:
    return [v[:7].clone(), v[7:].clone().view(13, 1)]


def test_parallel_gradients_leave_only_forget_part():
    f = torch.randn(20, dtype=torch.float64)
    d, stats = combine(_split(f), _split(-3.5 * f), "blur", Weights(1.5, 800.0))
    torch.testing.assert_close(flat(d), 1.5 * f)
    assert stats.as_floats()["cosine"] == pytest.approx(-1.0)


def test_zero_forget_gradient_gives_weighted_retain_without_nan():
    r = torch.randn(20, dtype=torch.float32)
    d, stats = combine(_split(torch.zeros(20)), _split(r), "blur", Weights(1.0, 2.0))
    assert torch.isfinite(flat(d)).all()
    torch.testing.assert_close(flat(d), 2.0 * r)
    assert math.isfinite(stats.as_floats()["xi"])


def test_projection_is_global_not_per_tensor():
    # Each tensor alone is orthogonal-free, but the whole vectors are not: a per-tensor
    # projection would give a different direction.
    g_f = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    g_r = [torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)]
    d, _ = combine(g_f, g_r, "blur", Weights(1.0, 1.0, 0.0))
    f, r = flat(g_f), flat(g_r)
    torch.testing.assert_close(flat(d), f + r - (r @ f) / (f @ f) * f)
    per_tensor = torch.cat([g_f[0] + g_r[0] - (g_r[0] @ g_f[0]) / (g_f[0] @ g_f[0]) * g_f[0],
                            g_f[1] + g_r[1] - (g_r[1] @ g_f[1]) / (g_f[1] @ g_f[1]) * g_f[1]])
    assert not torch.allclose(flat(d), per_tensor)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.1, 10))
def test_blur_upper_and_penalty_formulas(seed, gamma):
    g_f, g_r = grads(seed), grads(seed + 3)
    f, r = flat(g_f), flat(g_r)
    up, _ = combine(g_f, g_r, "blur_upper", Weights(1.0, gamma, 0.0))
    torch.testing.assert_close(flat(up), f + (gamma - (r @ f) / (r @ r)) * r)
    pen, _ = combine(g_f, g_r, "penalty", Weights(1.0, gamma))
    torch.testing.assert_close(flat(pen), f + gamma * r)


def test_xi_matches_scalar_form():
    g_f, g_r = grads(1), grads(2)
    _, stats = combine(g_f, g_r, "blur", Weights(1.3, 0.7, 0.0))
    f, r = flat(g_f), flat(g_r)
    assert stats.xi.item() == pytest.approx(1.3 - 0.7 * (r @ f).item() / (f @ f).item())


def test_in_place_form_overwrites_retain_list_and_pure_form_does_not_mutate():
    g_f, g_r = grads(4), grads(5)
    before_f, before_r = flat(g_f).clone(), flat(g_r).clone()
    d, _ = combine(g_f, g_r)
    torch.testing.assert_close(flat(g_f), before_f)
    torch.testing.assert_close(flat(g_r), before_r)
    combine_(g_f, g_r, "blur", Weights())
    torch.testing.assert_close(flat(g_r), flat(d))


def test_all_reduce_receives_three_scalars_once():
    calls = []

    def fake_all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return 2 * t  # as if a second rank held an identical shard

    g_f, g_r = grads(8), grads(9)
    combine_(g_f, g_r, "blur", Weights(), all_reduce=fake_all_reduce)
    assert calls == [torch.Size([3])]


def test_unknown_combiner_and_mismatched_lists_fail():
    with pytest.raises(ValueError, match="unknown combiner"):
        combine(grads(0), grads(1), "sum")
    with pytest.raises(ValueError, match="differ in length"):
        combine(grads(0), grads(1)[:2])
