"""LogSNRCosineScheduler against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from ehr_diffusers.schedulers import LogSNRCosineScheduler


def test_schedule_endpoints_and_identities():
    scheduler = LogSNRCosineScheduler(logsnr_min=-20, logsnr_max=20)
    assert float(scheduler.logsnr(0.0)) == pytest.approx(20, abs=1e-6)
    assert float(scheduler.logsnr(1.0)) == pytest.approx(-20, abs=1e-6)
    assert float(scheduler.logsnr(0.5)) == pytest.approx(0, abs=1e-9)  # symmetric limits: the middle is SNR 1
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    logsnr = scheduler.logsnr(u)
    assert (logsnr[1:] < logsnr[:-1]).all()
    b = math.atan(math.exp(-10))
    a = math.atan(math.exp(10)) - b
    assert float(logsnr[30]) == pytest.approx(-2 * math.log(math.tan(a * 0.3 + b)), rel=1e-9)
    alpha, sigma = scheduler.alpha_sigma(u)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha, dtype=torch.float64))
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), logsnr)
    other = LogSNRCosineScheduler(logsnr_min=-10, logsnr_max=5)
    assert float(other.logsnr(0.0)) == pytest.approx(5) and float(other.logsnr(1.0)) == pytest.approx(-10)


def test_training_helpers_are_consistent():
    scheduler = LogSNRCosineScheduler(prediction_type="v_prediction")
    x, eps = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    u = torch.rand(6, dtype=torch.float64)
    alpha, sigma = scheduler.alpha_sigma(u)
    z = scheduler.add_noise(x, eps, u)
    torch.testing.assert_close(z, alpha[:, None] * x + sigma[:, None] * eps)
    v = scheduler.training_target(x, eps, u)
    torch.testing.assert_close(v, alpha[:, None] * eps - sigma[:, None] * x)
    torch.testing.assert_close(scheduler.predict_original(v, z, u), x)  # x = alpha z - sigma v
    epsilon = LogSNRCosineScheduler(prediction_type="epsilon")
    torch.testing.assert_close(epsilon.predict_original(epsilon.training_target(x, eps, u), z, u), x)
    sample = LogSNRCosineScheduler(prediction_type="sample")
    assert sample.training_target(x, eps, u) is x


def test_sampled_times_cover_the_schedule_reproducibly():
    scheduler = LogSNRCosineScheduler()
    u = scheduler.sample_timesteps(8, generator=torch.Generator().manual_seed(0))
    assert ((u >= 0) & (u < 1)).all()
    assert sorted((u * 8).floor().long().tolist()) == list(range(8))  # one draw per stratum
    again = scheduler.sample_timesteps(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u, again)


def _step_inputs(scheduler, steps=4, index=1):
    """A fresh schedule and the inputs of its step ``index`` (a first call to ``step`` finds its index by value)."""
    scheduler.set_timesteps(steps)
    torch.manual_seed(0)
    z, eps_hat = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    return z, eps_hat, scheduler.timesteps[index], torch.tensor(1.0 - (index + 1) / steps, dtype=torch.float64)


def test_ddim_step_with_zero_noise_is_the_ddim_update():
    scheduler = LogSNRCosineScheduler(solver="ddim", eta=0.0)
    z, eps_hat, t, s = _step_inputs(scheduler)
    out = scheduler.step(eps_hat, t, z)
    alpha_t, sigma_t = scheduler.alpha_sigma(t.double())
    alpha_s, sigma_s = scheduler.alpha_sigma(s)
    x_hat = (z - sigma_t * eps_hat) / alpha_t
    torch.testing.assert_close(out.pred_original_sample, x_hat)
    torch.testing.assert_close(out.prev_sample, alpha_s * x_hat + sigma_s * eps_hat)


def test_ancestral_step_is_the_posterior_with_interpolated_variance():
    noise = torch.randn(3, 7, dtype=torch.float64)
    for v in (0.0, 0.1, 1.0):
        scheduler = LogSNRCosineScheduler(solver="ancestral", variance_interpolation=v)
        z, eps_hat, t, s = _step_inputs(scheduler)
        out = scheduler.step(eps_hat, t, z, variance_noise=noise).prev_sample
        alpha_t, sigma_t = scheduler.alpha_sigma(t.double())
        alpha_s, sigma_s = scheduler.alpha_sigma(s)
        x_hat = (z - sigma_t * eps_hat) / alpha_t
        r = (alpha_t**2 / sigma_t**2) / (alpha_s**2 / sigma_s**2)
        mean = r * alpha_s / alpha_t * z + (1 - r) * alpha_s * x_hat
        var = ((1 - r) * sigma_t**2) ** v * ((1 - r) * sigma_s**2) ** (1 - v)
        torch.testing.assert_close(out, mean + var.sqrt() * noise)
        if v == 0.0:  # the posterior step is DDIM with eta = 1 given the same noise
            ddim = LogSNRCosineScheduler(solver="ddim", eta=1.0)
            ddim.set_timesteps(4)
            torch.testing.assert_close(ddim.step(eps_hat, t, z, variance_noise=noise).prev_sample, out)


def test_dpm_solver_second_order_update():
    scheduler = LogSNRCosineScheduler(solver="dpmsolver++")
    scheduler.set_timesteps(5)
    torch.manual_seed(1)
    z0, x_first, x_second = (torch.randn(2, 4, dtype=torch.float64) for _ in range(3))
    t0, t1, t2 = scheduler.timesteps[0].double(), scheduler.timesteps[1].double(), scheduler.timesteps[2].double()
    lam = scheduler.logsnr
    alpha = lambda u: scheduler.alpha_sigma(u)[0]  # noqa: E731
    sigma = lambda u: scheduler.alpha_sigma(u)[1]  # noqa: E731
    sample = LogSNRCosineScheduler(solver="dpmsolver++", prediction_type="sample")
    sample.set_timesteps(5)
    z1 = sample.step(x_first, t0, z0).prev_sample
    h0 = 0.5 * (lam(t1) - lam(t0))
    torch.testing.assert_close(z1, sigma(t1) / sigma(t0) * z0 - alpha(t1) * torch.expm1(-h0) * x_first)
    z2 = sample.step(x_second, t1, z1).prev_sample
    h1 = 0.5 * (lam(t2) - lam(t1))
    k = h0 / h1
    d = (1 + 1 / (2 * k)) * x_second - 1 / (2 * k) * x_first
    torch.testing.assert_close(z2, sigma(t2) / sigma(t1) * z1 - alpha(t2) * torch.expm1(-h1) * d)


@pytest.mark.parametrize("solver", ["ancestral", "ddim", "dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_an_exact_model_samples_the_data(solver, prediction_type):
    scheduler = LogSNRCosineScheduler(solver=solver, prediction_type=prediction_type)
    scheduler.set_timesteps(12)
    x = torch.randn(5, 6)
    z = torch.randn(5, 6)
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        alpha, sigma = (value.float() for value in scheduler.alpha_sigma(t))
        eps = (z - alpha * x) / sigma
        output = eps if prediction_type == "epsilon" else alpha * eps - sigma * x
        z = scheduler.step(output, t, z, generator=generator).prev_sample
    torch.testing.assert_close(z, x, atol=1e-3, rtol=0)


def test_timesteps_and_per_item_generators():
    scheduler = LogSNRCosineScheduler(solver="ancestral")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        LogSNRCosineScheduler(prediction_type="x0")
    z, out = torch.randn(3, 4), torch.randn(3, 4)

    def first_step(generators):
        scheduler.set_timesteps(4)
        return scheduler.step(out, scheduler.timesteps[0], z, generator=generators).prev_sample

    batch = first_step([torch.Generator().manual_seed(i) for i in range(3)])
    scheduler.set_timesteps(4)
    alone = scheduler.step(out[1:2], scheduler.timesteps[0], z[1:2], generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(batch[1:2], alone.prev_sample)  # item i depends on its own generator only
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        scheduler.set_timesteps(4)
        scheduler.step(out, 0.3, z)


def test_clipping_and_thresholding_bound_the_estimate():
    z = torch.full((2, 10), 50.0)
    eps = torch.zeros(2, 10)
    clip = LogSNRCosineScheduler(clip_sample=True, clip_sample_range=2.0)
    assert clip.predict_original(eps, z, torch.tensor(0.5)).abs().max() == 2.0
    threshold = LogSNRCosineScheduler(thresholding=True, sample_max_value=3.0)
    assert threshold.predict_original(eps, z, torch.tensor(0.5)).abs().max() == pytest.approx(1.0)


def test_config_round_trip(tmp_path):
    scheduler = LogSNRCosineScheduler(logsnr_min=-15, solver="ancestral", variance_interpolation=0.3)
    scheduler.save_pretrained(tmp_path)
    loaded = LogSNRCosineScheduler.from_pretrained(tmp_path)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    u = torch.linspace(0, 1, 5)
    torch.testing.assert_close(loaded.logsnr(u), scheduler.logsnr(u))
    assert float(loaded.logsnr(1.0)) == pytest.approx(-15)
