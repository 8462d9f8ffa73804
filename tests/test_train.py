import math

import numpy as np
import pytest
import torch
from torch import nn

import cellvi
from cellvi.device import DeviceData
from cellvi.objectives import ELBO
from cellvi.priors import StandardNormal
from cellvi.train import TrainConfig, TrainingDiverged, default_max_epochs, evaluate, train


def test_default_max_epochs_scales_with_data():
    assert default_max_epochs(100) == 400
    assert default_max_epochs(10_000_000, epoch_cells=None) == 10  # full passes: the floor
    assert default_max_epochs(10_000_000) == 31  # epochs of at most 100,000 cells: ~6,000 steps
    assert default_max_epochs(1_000) > default_max_epochs(100_000)


class _Toy(nn.Module):
    """A tiny module with the VAE's ``elbo_terms`` (reconstruction -(x - w)², KL 0.1 w²)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.prior = StandardNormal(3)

    def elbo_terms(self, batch, prior=None):
        log_px = -((batch["x"] - self.w) ** 2).sum(-1)
        return log_px, 0.1 * (self.w**2).sum().expand(len(log_px))


class _Recording(ELBO):
    """The ELBO, recording each step's β; the loss turns NaN after ``nan_after`` steps."""

    def __init__(self, nan_after=None, **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "betas", [])
        object.__setattr__(self, "nan_after", nan_after)

    def loss(self, module, batch, beta, n_obs):
        self.betas.append(beta)
        loss, log_px, kl = super().loss(module, batch, beta, n_obs)
        if self.nan_after is not None and len(self.betas) > self.nan_after:
            loss = loss * math.nan
        return loss, log_px, kl


def _run(module=None, objective=None, callbacks=(), **config):
    config.setdefault("verbose", False)
    return train(module or _Toy(), _toy_data(), TrainConfig(**config), objective=objective,
                 callbacks=callbacks)


def _toy_data(n=200):
    rng = np.random.default_rng(0)
    return DeviceData.from_arrays(rng.normal(2.0, 1.0, (n, 3)).astype(np.float32), torch.device("cpu"))


def test_train_history_warmup_in_steps_and_fit():
    module, rec = _Toy(), _Recording()
    hist = _run(module, rec, max_epochs=30, batch_size=32, kl_warmup_steps=50, lr=0.05,
                early_stopping=False)
    assert hist["epoch"] == list(range(30))
    assert len(hist["train_elbo"]) == len(hist["validation_elbo"]) == 30
    assert rec.betas[0] == 0.0 and rec.betas[-1] == 1.0
    assert rec.betas[25] == pytest.approx(0.5)  # counted in steps, not epochs
    np.testing.assert_allclose(module.w.detach().numpy(), 2.0, atol=0.3)


def test_history_keeps_reconstruction_and_kl_apart():
    module = _Toy()
    hist = _run(module, max_epochs=4, batch_size=32, kl_warmup_steps=0, lr=0.05,
                early_stopping=False)
    for split in ("", "validation_"):
        recon, kl = np.array(hist[split + "reconstruction"]), np.array(hist[split + "kl"])
        assert len(recon) == len(kl) == 4 and (kl > 0).all() and (recon < 0).all()
    # after the warm-up (β = 1) the validation ELBO is exactly its two parts
    np.testing.assert_allclose(hist["validation_elbo"],
                               np.array(hist["validation_reconstruction"]) - hist["validation_kl"],
                               rtol=1e-6)
    w2 = float((module.w.detach() ** 2).sum())
    assert hist["validation_kl"][-1] == pytest.approx(0.1 * w2, rel=1e-5)


def test_kl_weight_is_the_end_of_the_warmup():
    rec = _Recording()
    hist = _run(objective=rec, max_epochs=5, batch_size=32, kl_warmup_steps=20, kl_weight=0.5,
                early_stopping=False)
    assert rec.betas[0] == 0.0 and rec.betas[10] == pytest.approx(0.25)
    assert rec.betas[-1] == 0.5 and hist["beta"][-1] == 0.5
    with pytest.raises(ValueError, match="kl_weight must be positive"):
        TrainConfig(max_epochs=1, kl_weight=0.0)


@pytest.mark.parametrize("field, value", [("max_epochs", 0), ("batch_size", 0), ("lr", -1.0),
                                          ("validation_fraction", 1.0), ("max_epochs", 2.5)])
def test_config_rejects_bad_settings_with_their_name(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_objective_schedule_replaces_the_warmup():
    from cellvi.objectives import Constant

    rec = _Recording(beta=Constant(0.25))
    hist = _run(objective=rec, max_epochs=2, batch_size=32, kl_warmup_steps=100)
    assert set(rec.betas) == {0.25} and hist["beta"] == [0.25, 0.25]


def test_callbacks_run_in_order_each_epoch_before_validation():
    calls = []
    hist = _run(callbacks=[lambda e, h: calls.append(("a", e, len(h["epoch"]))),
                           lambda e, h: calls.append(("b", e, len(h["epoch"])))],
                max_epochs=2, batch_size=64)
    assert calls == [("a", 0, 0), ("b", 0, 0), ("a", 1, 1), ("b", 1, 1)]
    assert len(hist["epoch"]) == 2


def test_callback_objects_see_each_stage_of_an_epoch():
    from cellvi.train import Callback

    class Stamps(Callback):
        def __init__(self):
            self.calls = []

        def on_epoch_start(self, epoch):
            self.calls.append(("start", epoch))

        def on_epoch_end(self, epoch, history):
            self.calls.append(("end", epoch, len(history["epoch"])))

        def on_validation_end(self, epoch, history):
            self.calls.append(("validated", epoch, len(history["epoch"])))

    stamps = Stamps()
    _run(callbacks=[stamps], max_epochs=2, batch_size=64)
    assert stamps.calls == [("start", 0), ("end", 0, 0), ("validated", 0, 1),
                            ("start", 1), ("end", 1, 1), ("validated", 1, 2)]
    with pytest.raises(TypeError, match="callback"):
        _run(callbacks=["not a callback"], max_epochs=1)


def test_early_stopping_stops_and_restores_best():
    module = _Toy()
    hist = _run(module, max_epochs=500, batch_size=32, lr=0.05, patience=5, kl_warmup_steps=0)
    assert len(hist["epoch"]) < 500
    best = max(hist["validation_elbo"])
    val = evaluate(module, _toy_data(), torch.as_tensor(np.sort(np.random.default_rng(0).permutation(200)[:20])))
    assert val["elbo"] == pytest.approx(best, rel=1e-5)


def test_nan_guard_raises_clear_error():
    with pytest.raises(TrainingDiverged, match="after 3 roll-backs.*Likely causes: a learning rate"):
        _run(objective=_Recording(nan_after=3), max_epochs=5, batch_size=32)
    with pytest.raises(TrainingDiverged, match="step 4\\. Likely causes"):  # no retries asked
        _run(objective=_Recording(nan_after=3), max_epochs=5, batch_size=32, nan_retries=0)


class _OneBadStep(ELBO):
    """The ELBO, with a NaN loss at one optimiser call (an injected fault)."""

    def __init__(self, at):
        super().__init__()
        object.__setattr__(self, "calls", [0])
        object.__setattr__(self, "at", at)

    def loss(self, module, batch, beta, n_obs):
        self.calls[0] += 1
        loss, log_px, kl = super().loss(module, batch, beta, n_obs)
        return (loss * math.nan if self.calls[0] == self.at else loss), log_px, kl


def test_a_nan_batch_rolls_back_lowers_the_learning_rate_and_training_goes_on(caplog):
    module = _Toy()
    with caplog.at_level("WARNING", logger="cellvi"):
        hist = _run(module, _OneBadStep(at=13), max_epochs=6, batch_size=32, lr=0.05,
                    kl_warmup_steps=0, early_stopping=False)
    assert "rolled back" in caplog.text and "lowered the learning rate to 0.005" in caplog.text
    assert hist["epoch"] == list(range(6)) and np.isfinite(hist["train_elbo"]).all()
    assert hist["lr"][0] == 0.05 and hist["lr"][-1] == pytest.approx(0.005)
    assert np.isfinite(module.w.detach().numpy()).all()
    # 180 training cells in batches of 32: 6 steps an epoch, so the fault hit epoch 2, which
    # was redone from its start at the lower rate
    assert hist["lr"][:2] == [0.05, 0.05] and hist["lr"][2] == pytest.approx(0.005)


def test_a_nan_in_the_networks_reaches_the_nan_guard_not_a_distribution_check():
    """The encoder's and decoder's distributions skip torch's argument checks: a NaN weight
    gives a NaN loss, which the guard handles (roll back, then a clear error), instead of a
    ``ValueError`` about a constraint from inside the forward pass."""
    from cellvi.decoders import ContinuousDecoder
    from cellvi.posteriors import GaussianEncoder
    from cellvi.priors import StandardNormal
    from cellvi.vae import VAE

    torch.manual_seed(0)
    vae = VAE(GaussianEncoder(3, 2, n_hidden=8), ContinuousDecoder(2, 3, n_hidden=8),
              StandardNormal(2), log1p_input=False)
    with torch.no_grad():
        vae.encoder.loc.weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="after 2 roll-backs"):
        train(vae, _toy_data(), TrainConfig(max_epochs=3, batch_size=32, nan_retries=2,
                                            verbose=False))


def test_train_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _Toy(), _Toy()
    _run(a, max_epochs=3, batch_size=16, seed=4)
    _run(b, max_epochs=3, batch_size=16, seed=4)
    torch.testing.assert_close(a.w, b.w)
    assert torch.equal(state, torch.random.get_rng_state())


def test_tiny_data_without_validation():
    data = DeviceData.from_arrays(np.ones((10, 3), np.float32), torch.device("cpu"))
    hist = train(_Toy(), data, TrainConfig(max_epochs=2, verbose=False))
    assert all(math.isnan(v) for v in hist["validation_elbo"])




def test_epoch_cells_caps_the_cells_an_epoch_sees():
    from dataclasses import dataclass, field

    import cellvi
    from cellvi.objectives import ELBO
    from cellvi.train import default_max_epochs

    @dataclass(frozen=True)
    class Counting(ELBO):
        cells: list = field(default_factory=list)

        def loss(self, module, batch, beta, n_obs):
            if module.training:
                self.cells.append(batch["x"].shape[0])
            return super().loss(module, batch, beta, n_obs)

    adata = cellvi.datasets.synthetic_counts(300, 30, n_groups=2, n_batches=1, seed=0)
    counting = Counting()
    model = cellvi.models.NBVAE(adata, n_latent=2, n_hidden=16)
    model.fit(max_epochs=3, batch_size=20, epoch_cells=100, objective=counting, verbose=False,
              early_stopping=False)
    assert counting.cells == [20] * 15  # 3 epochs of 100 cells, not of the 270 training cells
    assert len(model.history["epoch"]) == 3
    # the default budget counts steps of the capped epoch: more epochs, the same steps
    assert default_max_epochs(1_000_000, 512) == default_max_epochs(111_112, 512) == 31
    assert default_max_epochs(1_000_000, 512, epoch_cells=None) == 10
    assert default_max_epochs(50_000, 512) == default_max_epochs(50_000, 512, epoch_cells=None)


def test_large_data_budget_falls_to_its_cells_seen_from_1m_cells():
    from cellvi.train import LARGE_DATA_CELLS, default_max_epochs

    def budget(n, **kw):
        return default_max_epochs(n, 512, large_data_cells=LARGE_DATA_CELLS, **kw)

    # up to one epoch's worth of training cells: the 6,000 steps as before
    for n in (1_000, 50_000, 111_112):
        assert budget(n) == default_max_epochs(n, 512)
    # from 1M cells on: 2M cells seen, 20 epochs of 100,000 cells (3,920 steps)
    assert budget(1_000_000) == budget(5_000_000) == 20
    # in between it falls monotonically
    mid = [budget(n) for n in (150_000, 300_000, 600_000, 900_000)]
    assert 31 >= mid[0] >= mid[1] >= mid[2] >= mid[3] >= 20 and mid[0] > 20
    # a budget above 6,000 steps' cells changes nothing; no epoch cap: no large-data regime
    assert default_max_epochs(1_000_000, 512, large_data_cells=10**9) == 31
    assert budget(1_000_000, epoch_cells=None) == default_max_epochs(1_000_000, 512, epoch_cells=None)
    with pytest.raises(ValueError, match="large_data_cells"):
        cellvi.train.TrainConfig(large_data_cells=0)
    with pytest.raises(ValueError, match="epoch_cells"):
        cellvi.train.TrainConfig(epoch_cells=0)


def test_backward_precision_setting(monkeypatch):
    import cellvi.nn as cnn
    from cellvi.train import TrainConfig, resolve_backward_precision

    with pytest.raises(ValueError, match="backward_precision"):
        TrainConfig(backward_precision="half")
    assert resolve_backward_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_backward_precision("float32", "cpu") == "float32"
    assert resolve_backward_precision("bfloat16", "cuda") == "float32"  # CPU-only products
    for native in (True, False):
        monkeypatch.setattr(cnn, "native_bf16_cpu", lambda native=native: native)
        assert resolve_backward_precision("auto", "cpu") == ("bfloat16" if native else "float32")
        assert resolve_backward_precision("auto", "cuda") == "float32"


def test_nbvae_bf16_backward_trains_like_float32():
    """Forced bfloat16 gradients (whatever this CPU has) give the float32 run's validation
    ELBO within noise, and the setting used is recorded."""
    import cellvi
    from cellvi.datasets import synthetic_counts

    adata = synthetic_counts(600, 200, n_groups=3, n_batches=2, seed=0)
    runs = {}
    for prec in ("float32", "bfloat16"):
        m = cellvi.models.NBVAE(adata, batch_key="batch")
        m.fit(max_epochs=15, backward_precision=prec, verbose=False)
        assert m.train_settings["backward_precision"] == prec
        runs[prec] = m
    v32 = runs["float32"].history["validation_elbo"][-1]
    v16 = runs["bfloat16"].history["validation_elbo"][-1]
    assert v16 != v32  # the bfloat16 products were used
    assert abs(v16 - v32) < 0.01 * abs(v32)


def test_an_epoch_of_a_large_set_is_a_uniform_random_subset_in_random_order():
    """``DeviceData.shuffle(idx, n)``: below a quarter of ``idx``, a subset drawn without a
    full permutation; distinct cells, every cell equally likely; otherwise the head of a
    permutation (small data keep their exact order)."""
    from cellvi.device import _random_subset

    torch.manual_seed(0)
    counts = torch.zeros(1000)
    for _ in range(400):
        pick = _random_subset(1000, 200)
        assert len(pick) == 200 and len(torch.unique(pick)) == 200
        counts[pick] += 1
    # each cell is picked with probability 0.2: 80 of 400 draws (sd 8)
    assert 45 < counts.min() and counts.max() < 115 and abs(counts.mean() - 80) < 1e-6
    assert not torch.equal(pick, torch.sort(pick).values)  # in random order
    data = _toy_data(200)
    idx = torch.arange(200) * 3
    torch.manual_seed(1)
    head = data.shuffle(idx, 100)  # half of idx: the permutation's head, as before
    torch.manual_seed(1)
    assert torch.equal(head, idx[torch.randperm(200)][:100])
    sub = data.shuffle(idx, 40)
    assert len(sub) == 40 and len(torch.unique(sub)) == 40 and bool(torch.isin(sub, idx).all())


def test_a_batch_classifier_trains_in_its_own_adam_group():
    import torch

    from cellvi.objectives import BatchAdversary
    from cellvi.train import ADAM_EPS, _adam

    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    plain = _adam(module, 1e-3, 1e-6)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["eps"] == ADAM_EPS
    module.batch_adversary = BatchAdversary(3, [2])
    opt = _adam(module, 1e-3, 1e-6)
    vae, classifier = opt.param_groups
    assert {id(p) for p in classifier["params"]} == {id(p) for p in module.batch_adversary.parameters()}
    assert len(vae["params"]) == 2 and vae["eps"] == ADAM_EPS and vae["weight_decay"] == 1e-6
    assert classifier["eps"] == 1e-8 and classifier["weight_decay"] == 0.0 and classifier["lr"] == 1e-3
