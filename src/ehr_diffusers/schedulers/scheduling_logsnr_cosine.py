"""A continuous-time diffusion scheduler on the logSNR-cosine schedule, with ancestral, DDIM and DPM-Solver++(2M) steps.

Time ``u`` runs from 0 (data) to 1 (noise). The schedule is the cosine schedule written in log signal-to-noise ratio,

    lambda(u) = -2 log tan(a u + b),   b = arctan(exp(-logsnr_max / 2)),   a = arctan(exp(-logsnr_min / 2)) - b,

so that lambda(0) = logsnr_max and lambda(1) = logsnr_min, and

    alpha^2 = sigmoid(lambda),   sigma^2 = sigmoid(-lambda),   z_u = alpha x + sigma eps.

Sampling goes from u = 1 to u = 0 over ``set_timesteps(n)`` steps; a step goes from t to s < t (lambda_s > lambda_t).
With r = exp(lambda_t - lambda_s) = SNR(t) / SNR(s) and x_hat the model's estimate of x:

* ``ancestral`` (HealthForge's sampler): z_s ~ N(mu, var), with the posterior mean of q(z_s | z_t, x = x_hat)
  mu = r (alpha_s / alpha_t) z_t + (1 - r) alpha_s x_hat, and var interpolated in log space between the posterior
  variance (1 - r) sigma_s^2 and the forward variance (1 - r) sigma_t^2 with exponent ``variance_interpolation`` v:
  var = exp(v log((1 - r) sigma_t^2) + (1 - v) log((1 - r) sigma_s^2)) (Nichol & Dhariwal 2021, eq. 15).
* ``ddim``: z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise, c^2 = eta^2 (1 - r) sigma_s^2
  (Song et al. 2021); eta = 0 is deterministic, eta = 1 is the ancestral step with v = 0.
* ``dpmsolver++``: the second-order multistep solver in h = (lambda_s - lambda_t) / 2 on data predictions
  (Lu et al. 2022): z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) D, with D = x_hat on the first step (and
  on the last with ``lower_order_final`` and fewer than 15 steps) and D = (1 + 1 / (2 k)) x_hat - 1 / (2 k) x_hat_prev
  otherwise, where k = h_prev / h. It needs far fewer steps than the ancestral sampler for the same quality.

The model may predict epsilon, v = alpha eps - sigma x, or x itself (``prediction_type``); x_hat can be clipped or
dynamically thresholded before it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]
Solver = Literal["ancestral", "ddim", "dpmsolver++"]


@dataclass
class LogSNRCosineSchedulerOutput(BaseOutput):
    """``prev_sample``: z at the next (less noisy) time, the next model input; ``pred_original_sample``: x_hat."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-item value (shape (batch,) or ()) broadcast over the item's remaining dimensions."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


class LogSNRCosineScheduler(SchedulerMixin, ConfigMixin):
    """Continuous-time scheduler on the logSNR-cosine schedule (see the module docstring for the math).

    Args:
        logsnr_min: lambda at u = 1 (pure noise end); HealthForge uses -20.
        logsnr_max: lambda at u = 0 (data end); HealthForge uses 20.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".
        solver: "ancestral", "ddim" or "dpmsolver++".
        variance_interpolation: exponent v of the ancestral variance (0: posterior, 1: forward variance).
        eta: noise of the ddim solver (0: deterministic).
        clip_sample: clip x_hat to [-clip_sample_range, clip_sample_range].
        clip_sample_range: bound of the clipping.
        thresholding: dynamic thresholding of x_hat (Saharia et al. 2022), per item.
        dynamic_thresholding_ratio: quantile of |x_hat| used as the threshold.
        sample_max_value: largest threshold.
        lower_order_final: the last dpmsolver++ step is first order, which is steadier with few steps.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
        prediction_type: PredictionType = "epsilon",
        solver: Solver = "dpmsolver++",
        variance_interpolation: float = 0.1,
        eta: float = 0.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        lower_order_final: bool = True,
    ):
        if not logsnr_min < logsnr_max:
            raise ValueError(f"logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max})")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        if solver not in ("ancestral", "ddim", "dpmsolver++"):
            raise ValueError(f"solver must be ancestral, ddim or dpmsolver++, got {solver!r}")
        if not 0.0 <= variance_interpolation <= 1.0:
            raise ValueError(f"variance_interpolation must be in [0, 1], got {variance_interpolation}")
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self._step_index: int | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_hat, h) of the last dpmsolver++ step

    # ------------------------------------------------------------------ the schedule
    def logsnr(self, u: torch.Tensor | float) -> torch.Tensor:
        """lambda(u) = -2 log tan(a u + b), clamped to [logsnr_min, logsnr_max] against rounding at the ends."""
        u = torch.as_tensor(u, dtype=torch.float64)
        value = -2.0 * torch.log(torch.tan(self.a * u + self.b))
        return value.clamp(self.config.logsnr_min, self.config.logsnr_max)

    def alpha_sigma(self, u: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at time u: sqrt(sigmoid(lambda)) and sqrt(sigmoid(-lambda)); alpha^2 + sigma^2 = 1."""
        logsnr = self.logsnr(u)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    # ------------------------------------------------------------------ training
    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """One u per item, uniform on [0, 1), stratified over the batch (one draw in each of ``batch_size`` equal
        intervals, shuffled) so that every batch covers the whole schedule."""
        offsets = torch.rand((), generator=generator, device=device)
        strata = (torch.arange(batch_size, device=device) + offsets) / batch_size
        return strata[torch.randperm(batch_size, generator=generator, device=device)]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_u = alpha(u) x + sigma(u) eps, with one u per item."""
        alpha, sigma = self.alpha_sigma(timesteps)
        return _expand(alpha, original_samples) * original_samples + _expand(sigma, original_samples) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = alpha eps - sigma x (Salimans & Ho 2022)."""
        alpha, sigma = self.alpha_sigma(timesteps)
        return _expand(alpha, sample) * noise - _expand(sigma, sample) * sample

    def training_target(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict, for the configured ``prediction_type``."""
        if self.config.prediction_type == "epsilon":
            return noise
        if self.config.prediction_type == "v_prediction":
            return self.get_velocity(sample, noise, timesteps)
        return sample

    # ------------------------------------------------------------------ inference
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """``num_inference_steps`` times u from 1 down to 1/n; each step goes to the next, the last to u = 0."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        self.timesteps = grid[:-1].to(device=device, dtype=torch.float32)
        self._targets = grid[1:]
        self._step_index = None
        self._previous = None

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The model sees z_u as it is (variance-preserving schedule)."""
        return sample

    def _index_of(self, timestep: torch.Tensor | float) -> int:
        matches = (self.timesteps.cpu() - float(timestep)).abs() < 1e-6
        if not matches.any():
            raise ValueError(f"timestep {float(timestep)} is not one of the scheduler's timesteps; call set_timesteps")
        return int(matches.nonzero()[0])

    def predict_original(self, model_output: torch.Tensor, sample: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x_hat from the model output at time u, clipped or thresholded as configured."""
        alpha, sigma = (_expand(value, sample) for value in self.alpha_sigma(u))
        if self.config.prediction_type == "epsilon":
            x_hat = (sample - sigma * model_output) / alpha
        elif self.config.prediction_type == "v_prediction":
            x_hat = alpha * sample - sigma * model_output
        else:
            x_hat = model_output
        if self.config.thresholding:
            x_hat = self._threshold(x_hat)
        elif self.config.clip_sample:
            x_hat = x_hat.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x_hat

    def _threshold(self, x_hat: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding: per item, s = quantile of |x_hat| (at least 1, at most sample_max_value), then
        x_hat is clamped to [-s, s] and divided by s."""
        flat = x_hat.float().reshape(x_hat.shape[0], -1)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.config.sample_max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(x_hat.shape).to(x_hat.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> LogSNRCosineSchedulerOutput | tuple:
        """One step from ``timestep`` to the next time of ``set_timesteps``, with the configured solver.

        ``variance_noise`` replaces the fresh noise of the stochastic solvers (for tests and reproducibility);
        ``generator`` may be one generator or one per item, so that item i depends only on its own generator.
        The step is computed in at least float32 (x_hat divides by alpha, which half precision cannot afford) and
        returned in the sample's dtype.
        """
        dtype = sample.dtype
        if dtype in (torch.float16, torch.bfloat16):
            model_output, sample = model_output.float(), sample.float()
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        index = self._step_index
        t = self.timesteps[index].double()
        s = self._targets[index]
        x_hat = self.predict_original(model_output, sample, t)
        solver = self.config.solver
        if solver == "dpmsolver++":
            prev_sample = self._dpm_solver_step(x_hat, sample, t, s, last=index == len(self.timesteps) - 1)
        else:
            prev_sample = self._stochastic_step(x_hat, sample, t, s, generator, variance_noise)
        self._step_index = index + 1
        prev_sample, x_hat = prev_sample.to(dtype), x_hat.to(dtype)
        if not return_dict:
            return (prev_sample, x_hat)
        return LogSNRCosineSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x_hat)

    def _stochastic_step(
        self,
        x_hat: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: torch.Tensor | None,
    ) -> torch.Tensor:
        logsnr_t, logsnr_s = self.logsnr(t), self.logsnr(s)
        alpha_t, sigma_t = self.alpha_sigma(t)
        alpha_s, sigma_s = self.alpha_sigma(s)
        one_minus_r = -torch.expm1(logsnr_t - logsnr_s)  # 1 - SNR(t)/SNR(s), accurate when the two are close
        posterior_var = one_minus_r * sigma_s**2
        if self.config.solver == "ancestral":
            mean = (1 - one_minus_r) * (alpha_s / alpha_t) * z_t + one_minus_r * alpha_s * x_hat
            v = self.config.variance_interpolation
            var = torch.exp(v * torch.log(one_minus_r * sigma_t**2) + (1 - v) * torch.log(posterior_var))
        else:
            eps_hat = (z_t - alpha_t.to(z_t.dtype) * x_hat) / sigma_t.to(z_t.dtype)
            var = self.config.eta**2 * posterior_var
            mean = alpha_s * x_hat + torch.sqrt((sigma_s**2 - var).clamp(min=0)) * eps_hat
        mean = mean.to(z_t.dtype)
        if float(s) == 0.0 or float(var) == 0.0:  # the last step adds no noise: its result is the sample
            return mean
        if variance_noise is None:
            variance_noise = randn_tensor(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
        return mean + var.sqrt().to(z_t.dtype) * variance_noise

    def _dpm_solver_step(
        self, x_hat: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool
    ) -> torch.Tensor:
        alpha_t, sigma_t = self.alpha_sigma(t)
        alpha_s, sigma_s = self.alpha_sigma(s)
        h = 0.5 * (self.logsnr(s) - self.logsnr(t))
        data = x_hat
        first_order = self._previous is None or (last and self.config.lower_order_final and len(self.timesteps) < 15)
        if not first_order:
            previous_x, previous_h = self._previous
            k = previous_h / h
            data = (1 + 1 / (2 * k)).to(x_hat.dtype) * x_hat - (1 / (2 * k)).to(x_hat.dtype) * previous_x
        self._previous = (x_hat, h)
        ratio, coefficient = (sigma_s / sigma_t).to(z_t.dtype), (-alpha_s * torch.expm1(-h)).to(z_t.dtype)
        return ratio * z_t + coefficient * data
