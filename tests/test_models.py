import json

import numpy as np
import pytest
import torch

import cellvi
from cellvi.models import NBVAE


def test_latent_shapes_and_determinism(trained, sim_adata):
    z = trained.get_latent(sim_adata)
    assert z.shape == (sim_adata.n_obs, 10) and z.dtype == np.float32
    np.testing.assert_array_equal(z, trained.get_latent(sim_adata))
    s1 = trained.get_latent(sim_adata, mean=False, seed=1)
    s2 = trained.get_latent(sim_adata, mean=False, seed=1)
    np.testing.assert_array_equal(s1, s2)
    assert not np.allclose(s1, z)


def test_normalized_expression(trained, sim_adata):
    expr = trained.get_normalized_expression(sim_adata[:50], library_size=1e4)
    assert expr.shape == (50, sim_adata.n_vars) and expr.dtype == np.float32
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-4)
    b0 = trained.get_normalized_expression(sim_adata[:50], transform_batch="b0")
    b1 = trained.get_normalized_expression(sim_adata[:50], transform_batch={"batch": "b1"})
    assert not np.allclose(b0, b1)
    # cells already in b0 are unchanged by transform_batch="b0"
    in_b0 = (sim_adata.obs["batch"][:50] == "b0").to_numpy()
    np.testing.assert_allclose(b0[in_b0], expr[in_b0], rtol=1e-5)
    with pytest.raises(ValueError, match="not a category"):
        trained.get_normalized_expression(sim_adata[:5], transform_batch="b7")


def test_denoised_expression_recovers_batch_effect(trained, sim_adata):
    """Decoding the same cells as b0 vs b1 reproduces the simulated per-gene batch fold changes."""
    b0 = trained.get_normalized_expression(sim_adata, transform_batch="b0").mean(0)
    b1 = trained.get_normalized_expression(sim_adata, transform_batch="b1").mean(0)
    X = sim_adata.X.toarray()
    props = X / X.sum(1, keepdims=True)
    obs0 = props[(sim_adata.obs["batch"] == "b0").to_numpy()].mean(0)
    obs1 = props[(sim_adata.obs["batch"] == "b1").to_numpy()].mean(0)
    keep = (obs0 > 1e-3) & (obs1 > 1e-3)
    r = np.corrcoef(np.log(b1[keep] / b0[keep]), np.log(obs1[keep] / obs0[keep]))[0, 1]
    assert r > 0.8


def test_save_load_round_trip(trained, sim_adata, tmp_path):
    trained.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"] == "NBVAE" and cfg["var_names"] == list(sim_adata.var_names)
    assert cfg["categories"] == {"batch": ["b0", "b1"]} and cfg["cellvi_version"] == cellvi.__version__
    loaded = NBVAE.load(tmp_path / "m", adata=sim_adata, device="cpu")
    np.testing.assert_array_equal(loaded.get_latent(sim_adata), trained.get_latent(sim_adata))
    assert loaded.history == trained.history
    with pytest.raises(FileExistsError, match="overwrite"):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)
    with pytest.raises(RuntimeError, match="no training data"):
        loaded.fit()


def test_weights_file_is_not_a_pickle(trained, tmp_path):
    from safetensors.torch import load_file

    trained.save(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    head = (tmp_path / "m" / "model.safetensors").read_bytes()[:2]
    assert head != b"\x80\x04" and head[:1] != b"PK"  # neither a pickle nor a torch zip


def test_load_refuses_mismatches(trained, sim_adata, tmp_path):
    trained.save(tmp_path / "m")
    fewer = sim_adata[:, 5:].copy()
    with pytest.raises(ValueError, match="5 of the model's 300 genes are missing.*gene0"):
        NBVAE.load(tmp_path / "m", adata=fewer)
    shuffled = sim_adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="different order"):
        NBVAE.load(tmp_path / "m", adata=shuffled)
    other = sim_adata.copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories({"b1": "b5"})
    with pytest.raises(ValueError, match="not trained on.*b5"):
        NBVAE.load(tmp_path / "m", adata=other)
    with pytest.raises(FileNotFoundError, match="does not hold a saved cellvi model"):
        NBVAE.load(tmp_path / "nothing")


def test_untrained_model_errors(sim_adata):
    m = NBVAE(sim_adata)
    assert "untrained" in repr(m)
    with pytest.raises(RuntimeError, match="fit"):
        m.get_latent(sim_adata)


@pytest.mark.parametrize(
    "kwargs",
    [dict(likelihood="zinb"), dict(likelihood="poisson"), dict(dispersion="gene-batch"),
     dict(n_layers=2, norm="layer")],
)
def test_model_variants_train(small_adata, kwargs):
    m = NBVAE(small_adata, batch_key="batch", n_latent=3, **kwargs).fit(max_epochs=3, verbose=False)
    z = m.get_latent(small_adata)
    assert z.shape == (small_adata.n_obs, 3) and np.isfinite(z).all()
    assert np.isfinite(m.history["train_elbo"]).all()


def test_input_scale_encodes_library_normalized_counts(small_adata, tmp_path):
    """input_scale: the encoder sees log1p(x / library * input_scale), on the sparse
    (non-zeros) path and on the dense one; the setting survives save/load."""
    from cellvi.data import prepare_counts
    from cellvi.device import DeviceData

    m = NBVAE(small_adata, batch_key="batch", n_latent=3, input_scale=1e4).fit(max_epochs=2, verbose=False)
    assert m.settings["input_scale"] == 1e4
    d = prepare_counts(small_adata, batch_key="batch")
    batch = DeviceData.from_arrays(d.X, torch.device("cpu"), covs=d.covs,
                                   log_library=d.log_library).batch(torch.arange(small_adata.n_obs))
    assert "x_nonzero" in batch  # CSR input: the first layer runs on the non-zeros
    dense = {k: v for k, v in batch.items() if k != "x_nonzero"}
    X = np.asarray(small_adata.X.toarray(), dtype=np.float64)
    normalized = dict(dense, x=torch.as_tensor(X / X.sum(1, keepdims=True) * 1e4, dtype=torch.float32))
    with torch.no_grad():
        sparse_mean = m.module.encode(batch).mean
        dense_mean = m.module.encode(dense).mean
        m.module.input_scale = None  # by hand: the same encoder on normalized input
        by_hand = m.module.encode(normalized).mean
        m.module.input_scale = 1e4
    np.testing.assert_allclose(sparse_mean, dense_mean, atol=1e-5)
    np.testing.assert_allclose(dense_mean, by_hand, atol=1e-5)
    # the raw counts give another encoding (the library factor is not the identity)
    with torch.no_grad():
        m.module.input_scale = None
        assert not np.allclose(m.module.encode(dense).mean, dense_mean, atol=1e-3)
        m.module.input_scale = 1e4
    m.save(tmp_path / "m")
    loaded = NBVAE.load(tmp_path / "m", adata=small_adata, device="cpu")
    assert loaded.module.input_scale == 1e4
    # "median": the training cells' median library size, stored as a number
    med = NBVAE(small_adata, input_scale="median").settings["input_scale"]
    assert med == pytest.approx(float(np.median(np.asarray(small_adata.X.sum(1)))))
    np.testing.assert_array_equal(loaded.get_latent(small_adata), m.get_latent(small_adata))


def test_bad_model_settings(small_adata):
    with pytest.raises(ValueError, match="input_scale must be a positive number"):
        NBVAE(small_adata, input_scale=0)
    with pytest.raises(ValueError, match="'median' or None, got 'mean'"):
        NBVAE(small_adata, input_scale="mean")
    with pytest.raises(ValueError, match="likelihood"):
        NBVAE(small_adata, likelihood="gaussian")
    with pytest.raises(ValueError, match="gene-batch.*batch_key"):
        NBVAE(small_adata, dispersion="gene-batch")


def test_iwae_bound_above_elbo(trained, sim_adata):
    from cellvi.data import prepare_counts
    from cellvi.device import DeviceData

    d = prepare_counts(sim_adata[:200], batch_key="batch")
    batch = DeviceData.from_arrays(d.X, torch.device("cpu"), covs=d.covs,
                                   log_library=d.log_library).batch(torch.arange(200))
    torch.manual_seed(0)
    with torch.no_grad():
        e = torch.stack([trained.module.elbo(batch) for _ in range(50)]).mean(0)
        iw = trained.module.iwae(batch, n_samples=50)
    assert float((iw - e).mean()) > 0


def test_bad_sizes_and_seeds_are_refused(small_adata):
    with pytest.raises(ValueError, match="n_latent must be a positive integer"):
        NBVAE(small_adata, n_latent=0)
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        NBVAE(small_adata, n_layers=0)
    with pytest.raises(TypeError, match="seed must be a non-negative integer"):
        NBVAE(small_adata).fit(seed="x", max_epochs=1, verbose=False)
    with pytest.raises(TypeError, match="seed must be a non-negative integer"):
        cellvi.tl.nbvae(small_adata, seed="x", max_epochs=1, verbose=False)
    with pytest.raises(TypeError, match="unknown training setting"):
        NBVAE(small_adata).fit(max_epochs=1, verbose=False, on_epoch_end=print)


def test_duplicated_gene_names_are_refused(small_adata):
    dup = small_adata.copy()
    dup.var_names = [dup.var_names[0]] * 2 + list(dup.var_names[2:])
    with pytest.raises(ValueError, match="duplicated names"):
        NBVAE(dup)


def test_load_builds_through_the_same_setup_and_names_missing_fields(trained, sim_adata, tmp_path):
    import json

    trained.save(tmp_path / "m")
    back = NBVAE.load(tmp_path / "m")
    assert vars(back).keys() == vars(trained).keys()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["settings"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks \\['settings'\\]"):
        NBVAE.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NBVAE.load(tmp_path / "m")


def test_fit_callbacks_and_history_parts(small_adata):
    epochs = []
    m = NBVAE(small_adata, n_latent=3).fit(max_epochs=3, verbose=False,
                                           callbacks=[lambda e, h: epochs.append(e)])
    assert epochs == [0, 1, 2]
    h = m.history
    assert len(h["reconstruction"]) == len(h["kl"]) == 3 and min(h["kl"]) > 0
    np.testing.assert_allclose(h["validation_elbo"][-1],
                               h["validation_reconstruction"][-1] - h["validation_kl"][-1],
                               rtol=1e-5)


def test_encode_batch_false_feeds_the_batch_to_the_decoder_only(sim_adata, tmp_path):
    import cellvi

    ad = sim_adata.copy()
    model = cellvi.models.NBVAE(ad, batch_key="batch", encode_batch=False, n_hidden=32)
    model.fit(max_epochs=2, verbose=False)
    relabelled = ad.copy()
    cats = list(ad.obs["batch"].cat.categories)
    relabelled.obs["batch"] = ad.obs["batch"].map(dict(zip(cats, cats[::-1], strict=True))).astype("category")
    np.testing.assert_array_equal(model.get_latent(ad), model.get_latent(relabelled))
    assert model.module.decoder is not None and model.settings["encode_batch"] is False
    model.save(tmp_path / "m")
    loaded = cellvi.models.NBVAE.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.get_latent(ad), model.get_latent(ad))
    # the default encoder does see it
    default = cellvi.models.NBVAE(ad, batch_key="batch", n_hidden=32).fit(max_epochs=2, verbose=False)
    assert not np.array_equal(default.get_latent(ad), default.get_latent(relabelled))
    with pytest.raises(cellvi.errors.InvalidTypeError, match="encode_batch"):
        cellvi.models.NBVAE(ad, batch_key="batch", encode_batch="no")


def test_batch_penalty_lowers_the_latents_batch_dependence(sim_adata):
    import torch

    import cellvi
    from cellvi.objectives import batch_mmd

    ad = sim_adata.copy()
    codes = torch.as_tensor(ad.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)[:, None]
    mmd = {}
    for weight in (0.0, 200.0):
        m = cellvi.models.NBVAE(ad, batch_key="batch", encode_batch=False, n_hidden=32)
        m.fit(max_epochs=15, batch_penalty=weight, kl_warmup_steps=20, verbose=False, seed=0)
        mmd[weight] = float(batch_mmd(torch.as_tensor(m.get_latent(ad)), codes))
        assert "batch_penalty" in m.train_settings["objective"]
    assert mmd[200.0] < 0.7 * mmd[0.0]
    with pytest.raises(cellvi.errors.InvalidInputError, match="batch_key"):
        cellvi.models.NBVAE(ad).fit(max_epochs=1, batch_penalty=1.0, verbose=False)
    with pytest.raises(cellvi.errors.InvalidInputError, match="non-negative"):
        cellvi.models.NBVAE(ad, batch_key="batch").fit(max_epochs=1, batch_penalty=-1.0)


def _missing_type_fits(sim_adata, runs: dict):
    """Type 2 removed from batch 1 of the simulator; for each run (name -> ``fit`` keywords):
    ``(the missing type's silhouette, the shared types' within-type batch MMD)`` of the
    latent. Returns those, the last model and its AnnData."""
    import torch
    from sklearn.metrics import silhouette_samples

    import cellvi
    from cellvi.objectives import batch_mmd

    types = sim_adata.obs["group"].cat.codes.to_numpy()
    batch = sim_adata.obs["batch"].cat.codes.to_numpy()
    keep = ~((types == 2) & (batch == 1))
    ad, types, batch = sim_adata[keep].copy(), types[keep], batch[keep]
    shared = types < 2
    out = {}
    for name, kwargs in runs.items():
        m = cellvi.models.NBVAE(ad, batch_key="batch", n_hidden=32)
        m.fit(kl_warmup_steps=20, verbose=False, **kwargs)
        z = m.get_latent(ad)
        missing = float(silhouette_samples(z, types)[types == 2].mean())
        within = float(batch_mmd(torch.as_tensor(z[shared]), torch.as_tensor(batch[shared])[:, None].long(),
                                 groups=torch.as_tensor(types[shared]).long()))
        out[name] = (missing, within)
        assert m.train_settings["penalty_groups"] == (kwargs["penalty_groups"] if kwargs["batch_penalty"] else 0)
    return out, m, ad


def test_grouped_batch_penalty_mixes_shared_types_and_leaves_a_missing_type_alone(sim_adata):
    import cellvi

    out, _, ad = _missing_type_fits(sim_adata, {
        name: dict(max_epochs=15, batch_penalty=weight, penalty_groups=groups, seed=0)
        for name, weight, groups in (("none", 0.0, None), ("plain", 200.0, 0), ("grouped", 200.0, 3))})
    # the plain penalty pulls the missing type towards batch 1's cells; the grouped one does not
    assert out["plain"][0] < out["none"][0] - 0.1
    assert out["grouped"][0] > out["plain"][0] + 0.1
    # and the shared types' batches are mixed at least as well as by the plain penalty
    assert out["grouped"][1] < out["plain"][1] < 0.5 * out["none"][1]
    with pytest.raises(cellvi.errors.InvalidInputError, match="penalty_groups"):
        cellvi.models.NBVAE(ad, batch_key="batch").fit(max_epochs=1, batch_penalty=1.0, penalty_groups=-2)
    # by default a penalty aligns within PENALTY_GROUPS groups
    from cellvi.models.nbvae import PENALTY_GROUPS

    m = cellvi.models.NBVAE(ad, batch_key="batch", n_hidden=16).fit(max_epochs=1, batch_penalty=1.0,
                                                                    verbose=False)
    assert m.train_settings["penalty_groups"] == PENALTY_GROUPS == 8


def test_adversarial_batch_penalty_keeps_a_missing_type_and_leaves_no_classifier(sim_adata, tmp_path):
    import cellvi

    out, m, ad = _missing_type_fits(sim_adata, {
        name: dict(max_epochs=60, batch_penalty=weight, penalty_groups=groups, penalty="adversary", seed=1)
        for name, weight, groups in (("none", 0.0, None), ("grouped", 200.0, 3), ("plain", 200.0, 0))})
    # the classifier only served training
    assert not hasattr(m.module, "batch_adversary") and m.train_settings["penalty"] == "adversary"
    # the shared types' batches move together, the missing type keeps its own cluster
    # (conditioned on the groups; without them it is pushed towards batch 1's cells)
    assert out["grouped"][1] < 0.9 * out["none"][1]
    assert out["grouped"][0] > out["plain"][0]
    assert out["grouped"][0] > out["none"][0] - 0.02
    m.save(tmp_path / "m")
    again = cellvi.models.NBVAE.load(tmp_path / "m")
    np.testing.assert_allclose(again.get_latent(ad), m.get_latent(ad), atol=1e-6)
    with pytest.raises(cellvi.errors.InvalidInputError, match="penalty must be one of"):
        cellvi.models.NBVAE(ad, batch_key="batch").fit(max_epochs=1, batch_penalty=1.0, penalty="hsic")


def test_batch_log_ratios_match_dense_proportions_without_copying_the_counts():
    import tracemalloc

    import scipy.sparse as sp

    from cellvi.data import CountData
    from cellvi.models.nbvae import batch_log_ratios

    rng = np.random.default_rng(0)
    n, g = 40_000, 300
    X = sp.random(n, g, density=0.1, format="csr", dtype=np.float32, random_state=1)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    X = X + sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), np.zeros(n, int))), shape=(n, g))
    X = sp.csr_matrix(X, dtype=np.float32)
    covs = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], 1)
    lib = np.asarray(X.sum(1), dtype=np.float64)
    data = CountData(X, covs, ["a", "b"], {"a": ["0", "1", "2"], "b": ["0", "1"]},
                     np.log(lib).astype(np.float32), [str(i) for i in range(g)])
    dense = X.toarray() / lib
    pooled = np.log(dense.mean(0) + 1e-6)
    out = batch_log_ratios(data)
    for j, n_cat in enumerate((3, 2)):
        want = np.stack([np.log(dense[covs[:, j] == c].mean(0) + 1e-6) - pooled for c in range(n_cat)]) / 2
        np.testing.assert_allclose(out[j], want, rtol=1e-4, atol=1e-4)
    dense_out = batch_log_ratios(CountData(X.toarray(), covs, data.batch_keys, data.categories,
                                           data.log_library, data.var_names))
    np.testing.assert_allclose(dense_out[0], out[0], rtol=1e-4, atol=1e-4)
    tracemalloc.start()
    batch_log_ratios(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * (X.data.nbytes + X.indices.nbytes)  # no copy of the counts


def test_the_default_batch_penalty_follows_the_batch_separation_and_is_recorded(small_adata):
    from cellvi.metrics import batch_separation
    from cellvi.models.nbvae import BATCH_PENALTY, SEPARATION_THRESHOLD

    # the simulator's batches lie apart (separation 1): the penalty is on
    default = cellvi.models.NBVAE(small_adata, batch_key="batch").fit(max_epochs=1, verbose=False)
    assert default.train_settings["batch_penalty"] == BATCH_PENALTY == 100.0
    assert default.train_settings["batch_separation"] >= SEPARATION_THRESHOLD
    # a batch label drawn at random from cells of one distribution: off
    mixed = small_adata.copy()
    mixed.obs["random"] = np.random.default_rng(0).choice(["a", "b"], mixed.n_obs)
    assert abs(batch_separation(mixed.X, mixed.obs["random"])) < 0.1
    off = cellvi.models.NBVAE(mixed, batch_key="random").fit(max_epochs=1, verbose=False)
    assert off.train_settings["batch_penalty"] == 0.0
    assert off.train_settings["batch_separation"] < SEPARATION_THRESHOLD
    nobatch = cellvi.models.NBVAE(small_adata).fit(max_epochs=1, verbose=False)
    assert nobatch.train_settings["batch_penalty"] == 0.0
    assert nobatch.train_settings["batch_separation"] is None
    assert np.isnan(batch_separation(mixed.X, np.zeros(mixed.n_obs)))
    assert np.isnan(batch_separation(np.ones((40, 1)), mixed.obs["random"][:40]))  # no varying gene
    on = cellvi.models.NBVAE(small_adata, batch_key="batch").fit(
        max_epochs=1, batch_penalty=0.0, verbose=False)
    assert on.train_settings["batch_penalty"] == 0.0
    on = cellvi.models.NBVAE(small_adata, batch_key="batch").fit(
        max_epochs=1, batch_penalty=BATCH_PENALTY, verbose=False)
    assert on.train_settings["batch_penalty"] == BATCH_PENALTY == 100.0


def test_the_default_batch_penalty_falls_with_the_number_of_cells(small_adata, monkeypatch):
    import cellvi.models.nbvae as nbm
    from cellvi.models.nbvae import default_batch_penalty

    assert default_batch_penalty(300) == default_batch_penalty(1000) == 100.0
    assert default_batch_penalty(11_000) == default_batch_penalty(2_000_000) == 30.0
    mid = default_batch_penalty(int(round(1000 * 11 ** 0.5)))  # the geometric middle
    assert abs(mid - (100 * 30) ** 0.5) < 0.1
    sizes = [1000, 1500, 3300, 6000, 10_999]
    values = [default_batch_penalty(n) for n in sizes]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # falling
    # fit uses it with the data's number of cells (bounds moved so that this small set sits between)
    n = small_adata.n_obs
    monkeypatch.setattr(nbm, "PENALTY_CELLS", (n // 2, n * 2))
    m = cellvi.models.NBVAE(small_adata, batch_key="batch").fit(max_epochs=1, verbose=False)
    assert m.train_settings["batch_penalty"] == pytest.approx((100 * 30) ** 0.5)
