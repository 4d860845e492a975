import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from allocations import count_allocations_of_at_least
from loratrf import FilterOutputError, LoRALinear, LowRankTransform, TaskAwareFilter
from reference import filter_reference

leading = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


def trained_filter(dim, rank=4, alpha=8.0, dtype=torch.float64, **options):
    """A filter with a non-zero transform, as after some training."""
    f = TaskAwareFilter(dim, rank, alpha, dtype=dtype, **options)
    with torch.no_grad():
        f.transform.V.normal_()
    return f


def reference_of(f, h):
    return filter_reference(h, f.task_vector, f.transform.U, f.transform.V, f.transform.scale, f.similarity)


@given(st.integers(2, 32), st.integers(1, 6), st.floats(0.5, 32.0), leading, st.sampled_from(["cosine", "dot"]))
def test_filter_matches_the_papers_equations(dim, rank, alpha, lead, similarity):
    f = trained_filter(dim, rank, alpha, similarity=similarity)
    h = torch.randn(*lead, dim, dtype=torch.float64)
    if similarity == "cosine":  # push some tokens towards t, so clamp's both sides are exercised
        h = h + 2 * torch.randn(*lead, 1, dtype=torch.float64).abs() * f.task_vector
    torch.testing.assert_close(f(h), reference_of(f, h), rtol=1e-10, atol=1e-10)


@given(
    st.integers(2, 32),
    st.integers(1, 6),
    leading,
    st.sampled_from(["cosine", "dot"]),
    st.sampled_from(["normal", "ones"]),
)
def test_fresh_filter_is_exactly_the_identity(dim, rank, lead, similarity, task_init):
    f = TaskAwareFilter(dim, rank, similarity=similarity, task_init=task_init)
    h = torch.randn(*lead, dim)
    assert torch.equal(f(h), h)


def test_relevance_is_the_clamped_cosine():
    f = TaskAwareFilter(3, 1)
    with torch.no_grad():
        f.task_vector.copy_(torch.tensor([2.0, 0.0, 0.0]))
    h = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    expected = torch.tensor([1.0, 2**-0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(f.relevance(h).squeeze(-1), expected)
    f.similarity = "dot"
    torch.testing.assert_close(f.relevance(h).squeeze(-1), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))


def test_zero_tokens_get_zero_relevance_and_finite_gradients():
    f = trained_filter(8, dtype=torch.float32)
    h = torch.randn(3, 8)
    h[1] = 0.0
    h.requires_grad_()
    out = f(h)
    assert f.relevance(h)[1].item() == 0.0
    out.pow(2).sum().backward()
    for g in (h.grad, f.task_vector.grad, f.transform.U.grad, f.transform.V.grad):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_relevance_is_computed_in_float32(dtype):
    f = trained_filter(64, dtype=torch.float32)
    h = torch.randn(5, 64).to(dtype)
    s = f.relevance(h)
    assert s.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(h.double(), f.task_vector.double().expand(5, 64), dim=-1)
    torch.testing.assert_close(s.squeeze(-1).double(), cos.clamp(0, 1), rtol=1e-6, atol=1e-6)
    out = f(h)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference_of(f, h), rtol=2e-2, atol=2e-2)


def test_gradients_agree_with_finite_differences():
    f = trained_filter(6, rank=2)
    h = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    h.data += 3 * f.task_vector.data  # most tokens inside the clamp's open interval
    params = (f.task_vector, f.transform.U, f.transform.V)

    def run(h, *_):
        return f(h)

    torch.autograd.gradcheck(run, (h, *params))


def test_gradients_equal_the_references():
    f = trained_filter(6, rank=2)
    h = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = (h, f.task_vector, f.transform.U, f.transform.V)
    g = torch.randn(2, 3, 6, dtype=torch.float64)
    got = torch.autograd.grad(f(h), params, g)
    want = torch.autograd.grad(reference_of(f, h), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_wrong_width_names_the_fix():
    f = TaskAwareFilter(16, 2)
    with pytest.raises(FilterOutputError, match="filter_dim=12"):
        f(torch.randn(3, 12))


def test_filter_builds_no_hidden_sized_temporary_beyond_its_output():
    f = trained_filter(256, rank=8, dtype=torch.float32)
    h = torch.randn(4, 32, 256)
    assert count_allocations_of_at_least(h.numel(), f, h) == 1  # the output alone
    naive = lambda h: h + (f.relevance(h) * h) @ f.transform.U @ f.transform.V * f.transform.scale  # noqa: E731
    assert count_allocations_of_at_least(h.numel(), naive, h) >= 3  # the count can fail


def test_lora_forward_builds_no_output_sized_temporary_beyond_its_output():
    layer = LoRALinear(256, 512, rank=8)
    with torch.no_grad():
        layer.lora.V.normal_()
    x = torch.randn(4, 32, 256)
    assert count_allocations_of_at_least(4 * 32 * 512, layer, x) == 1


def test_low_rank_transform_alone():
    t = LowRankTransform(5, 3, rank=2, alpha=4.0, dtype=torch.float64)
    with torch.no_grad():
        t.V.normal_()
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(t(x), 2.0 * x @ t.U @ t.V)
    gate = torch.rand(7, 1, dtype=torch.float64)
    r = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(t(x, gate=gate, residual=r), r + 2.0 * (gate * x) @ t.U @ t.V)


def test_reset_parameters_returns_to_identity():
    f = trained_filter(8)
    f.reset_parameters()
    h = torch.randn(2, 8, dtype=torch.float64)
    assert torch.equal(f(h), h)


@pytest.mark.parametrize("kwargs", [dict(similarity="l2"), dict(task_init="zeros"), dict(rank=0)])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        TaskAwareFilter(8, **{"rank": 2, **kwargs})
