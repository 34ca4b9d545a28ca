"""Baselines: independent marginals, EDM preconditioning, the Karras schedule, the Heun sampler and the EHRDiff-style
model (training, sampling, save/load)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.evaluation.ehr.baselines import (
    BernoulliMarginals,
    continuous_columns,
    edm_loss,
    heun_sample,
    karras_sigmas,
    sample_ehrdiff,
    threshold_records,
    train_ehrdiff,
)
from ehr_diffusers.models.ehrdiff_baseline import EHRDiffMLP, edm_loss_weight, edm_preconditioning

TINY = {"hidden_dims": [32, 32], "time_dim": 16, "fourier_dim": 8}
CODE_PREVALENCE = np.array([0.9, 0.05, 0.5, 0.3, 0.0])


@pytest.fixture(scope="module")
def schema() -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", categories=["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18.0, maximum=90.0),
        ColumnGroup("death", "binary", categories=[False, True]),
        ColumnGroup("num_admissions", "count", minimum=0.0, maximum=10.0),
        ColumnGroup("marital_status", "one_hot", categories=["MARRIED", "MISSING", "SINGLE"]),
        ColumnGroup("race", "one_hot", categories=["MISSING", "WHITE"]),
        ColumnGroup("icd10_categories", "multi_hot", categories=["A01", "E11", "I10", "I50", "Z99"]),
    ])


def make_vectors(schema: EHRSchema, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, schema.dim), dtype=np.float32)
    out[:, 0] = rng.random(n) < 0.6
    out[:, 1] = rng.choice([0.0, 0.25, 0.5, 1.0], size=n, p=[0.1, 0.2, 0.3, 0.4])
    out[:, 2] = rng.random(n) < 0.2
    out[:, 3] = np.log1p(rng.integers(1, 4, size=n)) / np.log1p(10.0)
    out[np.arange(n), 4 + rng.choice(3, size=n, p=[0.5, 0.2, 0.3])] = 1.0
    out[np.arange(n), 7 + rng.choice(2, size=n, p=[0.25, 0.75])] = 1.0
    out[:, 9:] = rng.random((n, 5)) < CODE_PREVALENCE
    return out


# ---------------------------------------------------------------------------------------------- Bernoulli marginals
def test_bernoulli_marginals_reproduce_train_marginals(schema):
    train = make_vectors(schema, 400)
    n = 40_000
    synthetic = BernoulliMarginals().fit(train, schema).sample(n, seed=1)
    assert synthetic.shape == (n, schema.dim) and synthetic.dtype == np.float32
    zero_one = [c for c in range(schema.dim) if c not in continuous_columns(schema)]
    assert np.isin(synthetic[:, zero_one], (0.0, 1.0)).all()
    for name in ("marital_status", "race"):
        assert (synthetic[:, schema.slices[name]].sum(axis=1) == 1).all()
    train_p, synthetic_p = train.mean(axis=0), synthetic.mean(axis=0)
    # every 0/1 column (binary, one-hot share, code) within 4 binomial standard errors of its train rate
    error = 4 * np.sqrt(train_p * (1 - train_p) / n) + 1e-9
    assert (np.abs(synthetic_p - train_p)[zero_one] <= error[zero_one]).all()
    assert synthetic_p[schema.slices["icd10_categories"]][-1] == 0.0  # a code never seen is never drawn
    # age and admissions: only values seen in train, at their train shares
    for column in continuous_columns(schema):
        values, counts = np.unique(train[:, column], return_counts=True)
        assert np.isin(synthetic[:, column], values).all()
        shares = (synthetic[:, column][:, None] == values[None, :]).mean(axis=0)
        expected = counts / len(train)
        assert np.all(np.abs(shares - expected) <= 4 * np.sqrt(expected * (1 - expected) / n))
    # codes are drawn independently: the pair rate is the product of the rates
    codes = synthetic[:, schema.slices["icd10_categories"]]
    assert abs((codes[:, 0] * codes[:, 2]).mean() - codes[:, 0].mean() * codes[:, 2].mean()) < 0.01


def test_bernoulli_marginals_seeded_and_bad_input(schema):
    model = BernoulliMarginals().fit(make_vectors(schema, 50), schema)
    assert np.array_equal(model.sample(100, seed=3), model.sample(100, seed=3))
    assert not np.array_equal(model.sample(100, seed=3), model.sample(100, seed=4))
    with pytest.raises(ValueError, match="fit"):
        BernoulliMarginals().sample(5)
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)
    with pytest.raises(ValueError, match=r"train_vectors must have shape \(n, 14\)"):
        BernoulliMarginals().fit(np.zeros((4, 3)), schema)
    bad = make_vectors(schema, 10)
    bad[0, 9] = 0.7
    with pytest.raises(ValueError, match="icd10_categories"):
        BernoulliMarginals().fit(bad, schema)
    bad = make_vectors(schema, 10)
    bad[0, 4:7] = 0.0
    with pytest.raises(ValueError, match="marital_status"):
        BernoulliMarginals().fit(bad, schema)


# ---------------------------------------------------------------------------------------------- EDM pieces
@pytest.mark.parametrize(
    "sigma, sigma_data, expected",
    [
        # variance sigma^2 + sigma_data^2 = 0.5
        (0.5, 0.5, (0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4)),
        # variance 1.69, sqrt 1.3
        (1.2, 0.5, (0.25 / 1.69, 0.6 / 1.3, 1 / 1.3, math.log(1.2) / 4)),
        # EHRDiff's sigma_data: variance 0.0196 + 0.2304 = 0.25, sqrt 0.5
        (0.48, 0.14, (0.0784, 0.1344, 2.0, math.log(0.48) / 4)),
    ],
)
def test_edm_preconditioning_hand_values(sigma, sigma_data, expected):
    got = edm_preconditioning(torch.tensor(sigma, dtype=torch.float64), sigma_data)
    assert [float(v) for v in got] == pytest.approx(expected, rel=1e-12)
    assert float(edm_loss_weight(torch.tensor(sigma, dtype=torch.float64), sigma_data)) == pytest.approx(
        1 / expected[1] ** 2, rel=1e-12)


def test_untrained_model_is_the_skip_connection(schema):
    """The output layer starts at zero, so D(x; sigma) = c_skip x: the check that forward applies c_skip."""
    model = EHRDiffMLP(data_dim=schema.dim, sigma_data=0.14, **TINY)
    x = torch.randn(4, schema.dim)
    sigma = torch.tensor([0.02, 0.48, 3.0, 80.0])
    expected = (0.14**2 / (sigma**2 + 0.14**2))[:, None] * x
    torch.testing.assert_close(model(x, sigma).sample, expected)
    with pytest.raises(ValueError, match="sigma must be positive"):
        model(x, 0.0)
    with pytest.raises(ValueError, match="sample must be"):
        model(torch.randn(4, 3), 1.0)


def test_karras_sigmas_endpoints_and_rho():
    # sigma_max^(1/7) = 2, sigma_min^(1/7) = 1: the middle level is 1.5^7
    sigmas = karras_sigmas(3, sigma_min=1.0, sigma_max=128.0, rho=7.0)
    assert sigmas.tolist() == pytest.approx([128.0, 1.5**7, 1.0, 0.0], rel=1e-12)
    sigmas = karras_sigmas(32, sigma_min=0.02, sigma_max=80.0)
    assert len(sigmas) == 33 and sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.02)
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    # rho = 1 is evenly spaced
    assert karras_sigmas(5, 1.0, 5.0, rho=1.0).tolist() == pytest.approx([5, 4, 3, 2, 1, 0])
    with pytest.raises(ValueError, match="steps"):
        karras_sigmas(0, 0.02, 80.0)


def test_heun_with_exact_denoiser_of_one_point_lands_on_it():
    point = torch.tensor([[0.0, 1.0, 0.3, -2.0]], dtype=torch.float64)
    noise = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    out = heun_sample(lambda x, sigma: point.expand_as(x), noise, karras_sigmas(32, 0.02, 80.0))
    torch.testing.assert_close(out, point.expand(5, 4), rtol=0, atol=1e-10)


def test_heun_is_second_order_on_the_gaussian_probability_flow():
    """Data N(mu, s^2): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE keeps
    (x - mu) / sqrt(s^2 + sigma^2) constant. Algorithm 1 follows it from sigma_max to sigma_min and then returns
    D(x; sigma_min) (its last, Euler, step). Heun's error falls about 4x when the levels double (second order);
    Euler's alone would fall 2x."""
    mu, s, sigma_min, sigma_max = 0.3, 0.14, 0.02, 80.0
    noise = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    denoiser = lambda x, sigma: mu + s**2 / (s**2 + sigma**2) * (x - mu)  # noqa: E731
    at_sigma_min = mu + (noise * sigma_max - mu) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(s**2 + sigma_max**2)
    exact = denoiser(at_sigma_min, sigma_min)
    errors = [float((heun_sample(denoiser, noise, karras_sigmas(steps, sigma_min, sigma_max)) - exact).abs().max())
              for steps in (16, 32)]
    assert errors[1] < 0.015  # outputs spread over about +-0.5
    assert errors[0] / errors[1] > 3.5


def test_threshold_records_keeps_continuous_columns():
    raw = np.array([[0.49, 0.5, -0.2, 1.3], [0.51, 1.7, 0.4, -0.1]], dtype=np.float32)
    out = threshold_records(raw, continuous=[2])
    np.testing.assert_allclose(out, [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.4, 0.0]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- EHRDiff model
@pytest.fixture(scope="module")
def trained(schema):
    train = make_vectors(schema, 256)
    model = train_ehrdiff(train, schema, steps=300, batch_size=64, lr=3e-3, seed=0, show_progress=False,
                          model_config=TINY, warmup_steps=10)
    return train, model


def test_training_lowers_the_loss_and_learns_prevalence(schema, trained):
    train, model = trained
    untrained = EHRDiffMLP.from_config(model.config)  # zero output layer: D = c_skip x whatever the init
    batch = torch.from_numpy(train)
    before = edm_loss(untrained, batch, torch.Generator().manual_seed(5)).item()
    after = edm_loss(model, batch, torch.Generator().manual_seed(5)).item()
    assert after < 0.8 * before
    synthetic = sample_ehrdiff(model, 500, seed=0)
    codes = synthetic[:, schema.slices["icd10_categories"]].mean(axis=0)
    assert np.abs(codes - CODE_PREVALENCE).max() < 0.2
    assert model.config.continuous_columns == [1, 3] and not model.training


def test_samples_are_records_and_reproducible(schema, trained, tmp_path):
    _, model = trained
    synthetic = sample_ehrdiff(model, 40, seed=3, batch_size=7)
    assert synthetic.shape == (40, schema.dim) and synthetic.dtype == np.float32
    zero_one = [c for c in range(schema.dim) if c not in (1, 3)]
    assert np.isin(synthetic[:, zero_one], (0.0, 1.0)).all()
    assert ((synthetic[:, [1, 3]] >= 0) & (synthetic[:, [1, 3]] <= 1)).all()
    # the batch size does not matter (up to float rounding in the matrix products)
    np.testing.assert_allclose(synthetic, sample_ehrdiff(model, 40, seed=3, batch_size=40), atol=1e-5)
    assert not np.array_equal(synthetic, sample_ehrdiff(model, 40, seed=4))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = EHRDiffMLP.from_pretrained(tmp_path)
    assert loaded.config.continuous_columns == [1, 3]
    assert np.array_equal(synthetic, sample_ehrdiff(loaded, 40, seed=3, batch_size=7))


def test_ehrdiff_bad_input(schema):
    with pytest.raises(ValueError, match="train_vectors"):
        train_ehrdiff(np.zeros((5, 3), dtype=np.float32), schema, steps=1, show_progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_ehrdiff(make_vectors(schema, 5), schema, steps=0, show_progress=False)
    with pytest.raises(ValueError, match="hidden_dims"):
        EHRDiffMLP(data_dim=4, hidden_dims=[])
    with pytest.raises(ValueError, match="continuous_columns"):
        EHRDiffMLP(data_dim=4, continuous_columns=[4])
    with pytest.raises(ValueError, match="n must be"):
        sample_ehrdiff(EHRDiffMLP(data_dim=4, **TINY), 0)
