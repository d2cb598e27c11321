"""Dydiff's single-step models: the Gaussian ensemble learns a known linear system, elites and early stopping follow
MBPO's rules, predict() uses only elites, log-variances stay inside the learned bounds, the reward model learns a
linear reward, state_dict round-trips, fits are seeded, and bad inputs are rejected."""

from __future__ import annotations

import pytest
import torch

from diffrl.augment import dynamics
from diffrl.augment.dynamics import EarlyStopping, EnsembleDynamics, ModelFitSettings, RewardModel
from diffrl.errors import ConfigError

DO, DA, N = 3, 2, 600
FAST = ModelFitSettings(lr=3e-3, batch_size=64, max_epochs=60, patience=7)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_G = torch.Generator().manual_seed(1)
A_MAT = torch.eye(DO) + 0.2 * torch.randn(DO, DO, generator=_G)
B_MAT = torch.randn(DA, DO, generator=_G)


def linear_system(n: int = N, noise: float = 0.01, seed: int = 1):
    """Rows of the fixed system s' = A s + B a + noise: (obs, act, next_obs)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, DO, generator=g)
    act = torch.rand(n, DA, generator=g) * 2 - 1
    next_obs = obs @ A_MAT.T + act @ B_MAT + noise * torch.randn(n, DO, generator=g)
    return obs, act, next_obs


def small_ensemble(members: int = 4, elites: int = 2) -> EnsembleDynamics:
    return EnsembleDynamics(DO, DA, num_members=members, num_elites=elites, hidden=(32, 32))


@pytest.fixture(scope="module")
def fitted() -> tuple[EnsembleDynamics, dict[str, float]]:
    torch.manual_seed(0)
    model = small_ensemble()
    metrics = model.fit(*linear_system(), FAST, seed=0)
    return model, metrics


def test_ensemble_learns_a_linear_system_and_predict_adds_the_delta(fitted):
    model, metrics = fitted
    obs, act, next_obs = linear_system(n=200, seed=7)  # fresh rows
    delta_var = (next_obs - obs).var().item()
    assert metrics["holdout_mse"] < 0.02 * delta_var
    pred = model.predict(obs, act, torch.Generator().manual_seed(0))
    assert pred.shape == (200, DO)
    assert (pred - next_obs).pow(2).mean() < 0.02 * delta_var
    mean, _ = model(obs, act)  # predict = obs + the mean delta of one elite per row
    gaps = (pred - obs).unsqueeze(0) - mean[model.elites]  # (E, B, Do)
    assert torch.allclose(gaps.abs().amax(-1).amin(0), torch.zeros(200), atol=1e-6)


def test_sampled_prediction_is_noisy_but_centred_on_the_mean(fitted):
    model, _ = fitted
    obs, act, _ = linear_system(n=50, seed=8)
    g = torch.Generator().manual_seed(0)
    det = model.predict(obs, act, torch.Generator().manual_seed(0))
    samples = torch.stack([model.predict(obs, act, g, sample=True) for _ in range(2)])
    assert not torch.equal(samples[0], samples[1])
    assert (samples - det).abs().mean() < 0.5


def test_elite_selection_keeps_the_members_with_lowest_holdout_error(fitted):
    model = small_ensemble()
    model.load_state_dict(fitted[0].state_dict())
    obs, act, next_obs = linear_system(n=200, seed=9)
    best_two = model.select_elites(obs, act, next_obs).argsort()[:2]
    with torch.no_grad():
        for m in best_two:  # corrupt the two best members: they must drop out
            model.head.bias[m] += 5.0
    mse = model.select_elites(obs, act, next_obs)
    assert set(model.elites.tolist()).isdisjoint(best_two.tolist())
    assert model.elites.tolist() == mse.argsort()[:2].tolist()


def test_early_stopping_stops_after_patience_stale_epochs_and_restores_best_weights():
    weights = torch.zeros(2, 1)  # member m's weight = the epoch it was written in
    stopper = EarlyStopping([weights], patience=3)
    losses = [[1.0, 1.0], [0.5, 0.90], [0.499, 0.95], [0.40, 0.85], [0.399, 0.9], [0.45, 0.845], [0.45, 0.9],
              [0.1, 0.1]]  # epoch 7 would improve both, but training has stopped
    stopped_at = None
    for epoch, loss in enumerate(losses):
        weights.fill_(float(epoch))
        if stopper.update(torch.tensor(loss)):
            stopped_at = epoch
            break
    # last >1% improvement: epoch 3 (0.5 -> 0.40 and 0.90 -> 0.85); 0.499 and 0.845 are < 1% better, so stale
    assert stopped_at == 3 + 3
    stopper.restore()
    assert weights.squeeze(1).tolist() == [3.0, 3.0]
    assert stopper.best_loss.tolist() == pytest.approx([0.40, 0.85])


def test_early_stopping_restores_each_members_own_best_epoch():
    weights = torch.zeros(2, 2)
    stopper = EarlyStopping([weights], patience=2)
    for epoch, loss in enumerate([[1.0, 1.0], [0.5, 1.0], [0.5, 0.5], [0.6, 0.6], [0.6, 0.6]]):
        weights.fill_(float(epoch))
        stop = stopper.update(torch.tensor(loss))
    assert stop
    stopper.restore()
    assert weights[:, 0].tolist() == [1.0, 2.0]


def test_fit_stops_early_and_restores_each_members_best_holdout_weights(monkeypatch):
    stoppers: list[EarlyStopping] = []
    history: list[torch.Tensor] = []

    class Recording(EarlyStopping):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stoppers.append(self)

        def update(self, losses):
            history.append(losses.detach().clone())
            return super().update(losses)

    monkeypatch.setattr(dynamics, "EarlyStopping", Recording)
    model = small_ensemble()
    settings = ModelFitSettings(lr=3e-3, batch_size=64, patience=2, max_epochs=500)
    obs, act, next_obs = linear_system(n=200, noise=0.5)  # noisy: the holdout loss plateaus quickly
    metrics = model.fit(obs, act, next_obs, settings, seed=0)
    assert settings.patience < metrics["epochs"] < 500 and len(history) == metrics["epochs"]
    best = stoppers[0].best_loss
    assert metrics["holdout_mse_all"] == pytest.approx(best.mean().item(), rel=1e-5)  # the best weights are back
    assert history[-1].mean().item() != pytest.approx(best.mean().item(), rel=1e-5)  # ... not the last epoch's


def test_predict_draws_only_elite_members(fitted):
    model = small_ensemble()
    model.load_state_dict(fitted[0].state_dict())
    non_elites = [m for m in range(4) if m not in model.elites.tolist()]
    with torch.no_grad():
        model.head.bias[non_elites] = 1e6
    obs, act, _ = linear_system(n=500, seed=10)
    pred = model.predict(obs, act, torch.Generator().manual_seed(0))
    mean, _ = model(obs, act)  # (M, B, Do)
    drawn = torch.isclose(mean, (pred - obs).unsqueeze(0), atol=1e-5).all(-1)  # (M, B): row b used member m
    assert pred.abs().max() < 100
    assert not drawn[non_elites].any()
    assert drawn[model.elites].any(dim=1).all()  # every elite is drawn for some row
    assert drawn.any(dim=0).all()  # and every row came from a member


def test_logvar_stays_within_the_learned_bounds_and_nll_decreases():
    model = small_ensemble()
    obs, act, next_obs = linear_system(noise=0.05)
    delta = next_obs - obs

    def nll() -> float:
        with torch.no_grad():
            mean, logvar = model(obs, act)
            return ((mean - delta).pow(2) * torch.exp(-logvar) + logvar).mean().item()

    before = nll()
    metrics = model.fit(obs, act, next_obs, FAST, seed=0)
    assert nll() < before - 1.0
    assert metrics["train_nll"] < before
    assert not torch.equal(model.max_logvar, torch.full((1, DO), 0.5))  # the bounds are learned
    assert not torch.equal(model.min_logvar, torch.full((1, DO), -10.0))
    with torch.no_grad():
        extreme = [torch.randn(100, DO) * 1e3, torch.randn(100, DA) * 1e3]
        for o, a in (extreme, (obs, act)):
            _, logvar = model(o, a)
            assert (logvar <= model.max_logvar).all() and (logvar >= model.min_logvar).all()
        _, logvar = model(*extreme)  # far outside the data the raw log-variance runs off: a clamp is active
        to_bound = torch.minimum(logvar - model.min_logvar, model.max_logvar - logvar)
        assert to_bound.amin() < 1e-2


def test_reward_model_learns_a_linear_reward():
    g = torch.Generator().manual_seed(2)
    w, v = torch.randn(DO, generator=g), torch.randn(DA, generator=g)
    obs, act = torch.randn(N, DO, generator=g), torch.rand(N, DA, generator=g) * 2 - 1
    rew = obs @ w + act @ v
    model = RewardModel(DO, DA, hidden=(32, 32))
    metrics = model.fit(obs, act, rew, FAST, seed=0)
    assert metrics["holdout_mse"] < 0.02 * rew.var().item()
    obs2, act2 = torch.randn(200, DO, generator=g), torch.rand(200, DA, generator=g) * 2 - 1
    pred = model.predict(obs2, act2)
    assert pred.shape == (200,)
    assert (pred - (obs2 @ w + act2 @ v)).pow(2).mean() < 0.05 * rew.var().item()


def test_state_dict_round_trip_gives_identical_predictions(fitted):
    model, _ = fitted
    clone = small_ensemble()
    assert not torch.equal(clone.normalizer.shift, model.normalizer.shift)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.elites, model.elites)
    assert torch.equal(clone.normalizer.scale, model.normalizer.scale)
    obs, act, _ = linear_system(n=50, seed=11)
    for sample in (False, True):
        a = model.predict(obs, act, torch.Generator().manual_seed(3), sample=sample)
        b = clone.predict(obs, act, torch.Generator().manual_seed(3), sample=sample)
        assert torch.equal(a, b)
    reward = RewardModel(DO, DA, hidden=(8,))
    reward.fit(obs, act, obs.sum(-1), ModelFitSettings(max_epochs=2), seed=0)
    reward_clone = RewardModel(DO, DA, hidden=(8,))
    reward_clone.load_state_dict(reward.state_dict())
    assert torch.equal(reward.predict(obs, act), reward_clone.predict(obs, act))


def test_fits_with_the_same_seed_give_identical_weights():
    settings = ModelFitSettings(lr=3e-3, batch_size=64, max_epochs=3)
    data = linear_system(n=300)

    def fit(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # same initial weights
        model = small_ensemble()
        torch.manual_seed(global_seed)  # the global RNG must not matter
        model.fit(*data, settings, seed=seed)
        return model.state_dict()

    a, b, c = fit(0, global_seed=100), fit(0, global_seed=200), fit(1, global_seed=100)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)

    def fit_reward(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = RewardModel(DO, DA, hidden=(16,))
        torch.manual_seed(global_seed)
        model.fit(data[0], data[1], data[2].sum(-1), settings, seed=seed)
        return model.state_dict()

    ra, rb = fit_reward(4, global_seed=1), fit_reward(4, global_seed=2)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


@pytest.mark.parametrize("case", ["empty", "rows", "obs_dim", "next_obs", "nan", "too_few"])
def test_ensemble_fit_rejects_bad_inputs(case):
    obs, act, next_obs = linear_system(n=20)
    if case == "empty":
        obs, act, next_obs = obs[:0], act[:0], next_obs[:0]
    elif case == "rows":
        act = act[:-1]
    elif case == "obs_dim":
        obs, next_obs = obs[:, :2], next_obs[:, :2]
    elif case == "next_obs":
        next_obs = next_obs[:-1]
    elif case == "nan":
        next_obs[3, 1] = float("nan")
    elif case == "too_few":
        obs, act, next_obs = obs[:3], act[:3], next_obs[:3]
    with pytest.raises(ValueError, match="EnsembleDynamics.fit|rows"):
        small_ensemble().fit(obs, act, next_obs, FAST)


def test_reward_fit_predict_and_settings_reject_bad_inputs():
    obs, act, _ = linear_system(n=20)
    model = RewardModel(DO, DA, hidden=(8,))
    with pytest.raises(ValueError, match="rew must have shape"):
        model.fit(obs, act, torch.zeros(20, 1), FAST)
    with pytest.raises(ValueError, match="obs has 20 rows but act has 19"):
        model.predict(obs, act[:-1])
    with pytest.raises(ValueError, match="act must have shape"):
        small_ensemble().predict(obs, act[:, :1])
    with pytest.raises(ValueError, match="num_elites=5"):
        EnsembleDynamics(DO, DA, num_members=4, num_elites=5)
    for bad in (dict(lr=0.0), dict(holdout_fraction=1.0), dict(patience=0), dict(max_epochs=0),
                dict(weight_decay=-1.0), dict(batch_size=0)):
        with pytest.raises(ConfigError):
            ModelFitSettings(**bad)
