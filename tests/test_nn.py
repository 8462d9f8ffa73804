import pytest
import torch
import torch.nn.functional as F

from cellvi.nn import MLP, CovariateEmbedding


def test_embedding_equals_one_hot_linear():
    torch.manual_seed(0)
    emb = CovariateEmbedding([3, 4], 5)
    covs = torch.tensor([[0, 3], [2, 1], [1, 0]])
    one_hot = torch.cat([F.one_hot(covs[:, 0], 3), F.one_hot(covs[:, 1], 4)], 1).float()
    W = torch.cat([emb.embeddings[0].weight, emb.embeddings[1].weight], 0)
    torch.testing.assert_close(emb(covs), one_hot @ W)


def test_mlp_shapes_and_covariates_matter():
    torch.manual_seed(0)
    mlp = MLP(10, 16, n_layers=2, n_cats_per_cov=[2], dropout=0.0).eval()
    x = torch.randn(8, 10)
    a = mlp(x, torch.zeros(8, 1, dtype=torch.long))
    b = mlp(x, torch.ones(8, 1, dtype=torch.long))
    assert a.shape == (8, 16)
    assert not torch.allclose(a, b)
    # leading sample dimension (IWAE) works, also with batch norm
    x3 = torch.randn(4, 8, 10)
    out = mlp(x3, torch.zeros(4, 8, 1, dtype=torch.long))
    torch.testing.assert_close(out[1], mlp(x3[1], torch.zeros(8, 1, dtype=torch.long)))


def test_mlp_needs_covariates_when_built_with_them():
    mlp = MLP(3, 4, n_cats_per_cov=[2])
    with pytest.raises(ValueError, match="covariates"):
        mlp(torch.randn(5, 3))


@pytest.mark.parametrize("norm", ["batch", "layer", None])
def test_norms(norm):
    assert MLP(3, 4, norm=norm)(torch.randn(5, 3)).shape == (5, 4)


def test_bad_settings():
    with pytest.raises(ValueError, match="n_layers"):
        MLP(3, 4, n_layers=0)
    with pytest.raises(ValueError, match="norm"):
        MLP(3, 4, norm="group")


def test_sparse_rows_first_layer_equals_dense():
    from cellvi.distributions import nonzeros_of
    from cellvi.nn import SparseRows

    torch.manual_seed(0)
    x = torch.poisson(torch.rand(9, 30) * 2) * (torch.rand(9, 30) > 0.7)
    x[4] = 0  # an empty row
    mlp = MLP(30, 8, n_layers=2, n_cats_per_cov=[2], dropout=0.0).eval()
    covs = torch.randint(0, 2, (9, 1))
    rows, cols, vals = nonzeros_of(x)
    sparse = SparseRows(rows, cols, vals, 9)
    torch.testing.assert_close(mlp(sparse, covs), mlp(x, covs))
    # gradients w.r.t. the first layer agree
    mlp.train()
    mlp.zero_grad()
    mlp.eval()
    mlp(sparse, covs).sum().backward()
    g_sparse = mlp.linears[0].weight.grad.clone()
    mlp.zero_grad()
    mlp(x, covs).sum().backward()
    torch.testing.assert_close(g_sparse, mlp.linears[0].weight.grad)


@pytest.mark.parametrize("share", [0.0, 1.1])  # the dense and the sparse weight gradient
def test_sparse_linear_gradients_match_dense(monkeypatch, share):
    import cellvi.nn as cnn
    from cellvi.distributions import nonzeros_of

    monkeypatch.setattr(cnn, "DENSE_GRADIENT_SHARE", share)
    torch.manual_seed(1)
    x = (torch.poisson(torch.rand(7, 12) * 3) * (torch.rand(7, 12) > 0.6)).double()
    x[2] = 0  # an empty row
    rows, cols, vals = nonzeros_of(x)
    lin = torch.nn.Linear(12, 5).double()
    vals = vals.clone().requires_grad_(True)
    out = cnn.sparse_linear(cnn.SparseRows(rows, cols, vals, 7), lin)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    dense = torch.zeros_like(x).index_put((rows, cols), vals.detach()).requires_grad_(True)
    lin_ref = torch.nn.Linear(12, 5).double()
    lin_ref.load_state_dict(lin.state_dict())
    (lin_ref(dense) * weights).sum().backward()
    torch.testing.assert_close(out, lin_ref(dense))
    torch.testing.assert_close(lin.weight.grad, lin_ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, lin_ref.bias.grad)
    torch.testing.assert_close(vals.grad, dense.grad[rows, cols])
    assert torch.autograd.gradcheck(
        lambda v, w: cnn._SparseLinear.apply(rows, cols, v, cnn.SparseRows(rows, cols, v, 7).offsets(), 7, w),
        (vals.detach().clone().requires_grad_(True), lin.weight.detach().clone().requires_grad_(True)))


@pytest.mark.parametrize("share", [0.0, 1.1])
def test_sparse_linear_repeated_entries_add_up(monkeypatch, share):
    """A (row, col) given twice counts twice, in the output and in the weight gradient."""
    import cellvi.nn as cnn

    monkeypatch.setattr(cnn, "DENSE_GRADIENT_SHARE", share)
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([2, 2, 0])
    vals = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    lin = torch.nn.Linear(3, 2).double()
    out = cnn.sparse_linear(cnn.SparseRows(rows, cols, vals, 2), lin)
    dense = torch.tensor([[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, lin(dense))
    out.sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(2, 2, dtype=torch.float64) @ dense)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_backward_addmm_keeps_the_forward_and_rounds_only_the_gradients():
    import cellvi.nn as cnn

    torch.manual_seed(0)
    bias, x, w = torch.randn(300), torch.randn(64, 40), torch.randn(40, 300)
    params = [t.clone().requires_grad_(True) for t in (bias, x, w)]
    ref = [t.clone().requires_grad_(True) for t in (bias, x, w)]
    g = torch.randn(64, 300)
    with cnn.bf16_backward():
        out = cnn.addmm(*params)
    out_ref = torch.addmm(*ref)
    assert torch.equal(out, out_ref)  # the forward is float32, bit for bit
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(params[0].grad, ref[0].grad)  # the bias gradient is a float32 sum
    for p, r in zip(params[1:], ref[1:], strict=True):
        assert 0 < _rel(p.grad, r.grad) < 1e-2  # bfloat16 operands: ~0.3% off, not exact
    # outside the block (and for float64) the plain product, exact gradients
    for dtype, block in ((torch.float32, False), (torch.float64, True)):
        a = [t.to(dtype).clone().requires_grad_(True) for t in (bias, x, w)]
        with cnn.bf16_backward(block):
            (cnn.addmm(*a) * g.to(dtype)).sum().backward()
        torch.testing.assert_close(a[2].grad, x.to(dtype).t() @ g.to(dtype))


def test_dense_linear_in_bf16_backward_matches_the_layer_forward_and_its_gradients():
    """The MLP's and the heads' layers (any leading dimensions, as for sampled latents)."""
    import cellvi.nn as cnn

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 128)
    x = torch.randn(3, 50, 48, requires_grad=True)
    g = torch.randn(3, 50, 128)
    with cnn.bf16_backward():
        out = cnn.dense_linear(x, layer)
    assert out.shape == (3, 50, 128) and torch.equal(out, layer(x))  # float32 forward, bit for bit
    (out * g).sum().backward()
    grads = [x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]
    x.grad = None
    layer.zero_grad()
    (layer(x) * g).sum().backward()
    for got, ref in zip(grads[:2], (x.grad, layer.weight.grad), strict=True):
        assert 0 < _rel(got, ref) < 1e-2  # bfloat16 operands
    torch.testing.assert_close(grads[2], layer.bias.grad)
    no_bias = torch.nn.Linear(48, 8, bias=False)  # falls back to the layer itself
    with cnn.bf16_backward():
        torch.testing.assert_close(cnn.dense_linear(x, no_bias), no_bias(x))


def test_bf16_backward_sparse_linear_weight_gradient(monkeypatch):
    import cellvi.nn as cnn
    from cellvi.distributions import nonzeros_of

    monkeypatch.setattr(cnn, "DENSE_GRADIENT_SHARE", 0.0)  # the dense-product branch
    torch.manual_seed(2)
    x = torch.poisson(torch.rand(50, 80) * 2) * (torch.rand(50, 80) > 0.7)
    rows, cols, vals = nonzeros_of(x)
    lin = torch.nn.Linear(80, 30)
    weights = torch.randn(50, 30)
    with cnn.bf16_backward():
        out = cnn.sparse_linear(cnn.SparseRows(rows, cols, vals, 50), lin)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, lin(x))
    exact = weights.t() @ x
    assert 0 < _rel(lin.weight.grad, exact) < 1e-2


def test_native_bf16_cpu_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    import cellvi.nn as cnn

    real_open = builtins.open
    for flags, want in (("fpu sse avx512f avx512_bf16", True), ("fpu amx_bf16", True),
                        ("fpu sse avx2 avx512f", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(cnn.sys, "platform", "linux")
        monkeypatch.setattr(builtins, "open",
                            lambda f, *a, info=info, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
        cnn.native_bf16_cpu.cache_clear()
        assert cnn.native_bf16_cpu() is want
        monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(cnn.sys, "platform", "darwin")
    cnn.native_bf16_cpu.cache_clear()
    assert cnn.native_bf16_cpu() is False
    monkeypatch.undo()
    cnn.native_bf16_cpu.cache_clear()


@pytest.mark.parametrize("bf16", [False, True])
def test_dense_heads_equal_the_layers_one_by_one(bf16):
    import cellvi.nn as cnn

    torch.manual_seed(0)
    heads = [torch.nn.Linear(32, 10), torch.nn.Linear(32, 7)]
    x = torch.randn(4, 25, 32, requires_grad=True)
    with cnn.bf16_backward(bf16):
        outs = cnn.dense_heads(x, heads)
    refs = [h(x) for h in heads]
    for o, r in zip(outs, refs, strict=True):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r)
    g = [torch.randn_like(r) for r in refs]
    wrt = [x, heads[0].weight, heads[1].bias]
    got = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(outs, g, strict=True)), wrt)
    ref = torch.autograd.grad(sum((r * gi).sum() for r, gi in zip(refs, g, strict=True)), wrt)
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < (1e-2 if bf16 else 1e-6)
