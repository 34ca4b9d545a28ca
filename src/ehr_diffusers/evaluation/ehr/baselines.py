"""Baselines that the evaluation scores exactly like generated records: every one returns float32 vectors in the
``EHRSchema`` layout (binary fields and codes 0/1, age and admissions scaled to [0, 1], one-hot groups).

* Independent marginals (:class:`BernoulliMarginals`): each code and each binary field is an independent Bernoulli
  with its training prevalence; each one-hot group draws one category from the training shares; age and admissions
  are drawn from their training values. It matches per-code prevalence by construction and has no correlation
  structure, so it is the floor for every figure about code co-occurrence, and a model that does not beat it on
  prevalence has learnt nothing per code either.
* Real train rows (the reference, "train"): a seeded sample of the train split without replacement, as many rows as
  the other sets (all of train when it is smaller), taken as they are. They are fresh patients to the holdout, so
  their fidelity figures are what real data of that size reach against it (the ceiling a generator can aim at), and
  they are the training patients themselves, so their memorisation figures are those of a generator that copies (DCR
  share well above 0.5, every record an exact copy). It replaces half the holdout as the ceiling: fidelity is scored
  against the whole holdout, which that half belongs to.
* EHRDiff-style diffusion (:func:`train_ehrdiff`, :func:`sample_ehrdiff`): Yuan et al. 2023, "EHRDiff: Exploring
  realistic EHR synthesis with diffusion models" (https://github.com/sczzz3/EHRDiff). An MLP denoiser
  (:class:`~ehr_diffusers.models.ehrdiff_baseline.EHRDiffMLP`) trained directly on the record vector with EDM's
  preconditioning and loss (Karras et al. 2022): ln sigma ~ N(P_mean = -1.2, P_std = 1.2), loss weight
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; sampled with EDM's deterministic Heun sampler
  (Karras et al. 2022, Algorithm 1) over 32 noise levels sigma_i = (sigma_max^(1/rho) + i / (N - 1)
  (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7, then sigma_N = 0 (63 network evaluations), from sigma_max 80
  to sigma_min 0.02 as EHRDiff's MIMIC configuration. Afterwards every 0/1 column is thresholded at 0.5 (EHRDiff
  rounds the clipped output the same way) and the continuous columns are clipped to [0, 1]. One-hot groups are
  thresholded column by column too, not reduced by argmax, as EHRDiff does: a record with no or two marital
  statuses stays so, and the plausibility check counts it.

Where this differs from EHRDiff, besides the network (see its module): EHRDiff trains on ICD codes only, this on the
whole record vector (demographics included); it trains EHRDiff's widths (4.7M parameters) for 5,000 epochs with batch
1,024, learning rate 3e-4, a 20,000-step warm-up and an EMA of 0.999, where the default here is a CPU run of a minute
or two: three hidden layers of 256, 4,000 steps of 256 rows (256 epochs of 4,000 patients), learning rate 1e-3, a
100-step warm-up, cosine decay, EMA 0.995 with the usual warm-up of the decay. Each record's starting noise comes from
its own generator (``sampling.record_generator``), so record i does not depend on the batch size.

Trained this briefly the model is smooth: its raw outputs hold about the right number of codes per patient (10.5 vs
11.3 on the demo cohort) but as soft values of 0.1 to 0.3, so thresholding keeps 2 to 3 codes per patient while the
per-code prevalence still correlates at r 0.95 with the training split. Longer training (12,000 steps) or EHRDiff's
widths did not change that at CPU budgets; it is what this baseline is at this budget, not a thresholding error.

:func:`baseline_vectors` makes the named baselines of one evaluation run, each fitted on the whole real train split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ...data.ehr.schema import EHRSchema
from .data import RealData

if TYPE_CHECKING:  # torch and the EHRDiff network load only when that baseline is trained
    import torch

    from ...models.ehrdiff_baseline import EHRDiffMLP

logger = logging.getLogger(__name__)

ZERO_ONE_KINDS = ("binary", "one_hot", "multi_hot")
SAMPLE_CHUNK_ROWS = 8192


def _check_vectors(vectors: Any, schema: EHRSchema, argument: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != schema.dim:
        raise ValueError(f"{argument} must have shape (n, {schema.dim}) (the schema's layout), got {array.shape}")
    if len(array) == 0:
        raise ValueError(f"{argument} has no rows")
    if not np.isfinite(array).all():
        raise ValueError(f"{argument} holds NaN or infinite values")
    return array


def continuous_columns(schema: EHRSchema) -> list[int]:
    """The vector columns that hold continuous values in [0, 1] (continuous and count groups)."""
    return [schema.slices[g.name].start for g in schema.groups if g.kind not in ZERO_ONE_KINDS]


# ---------------------------------------------------------------------------------------------- independent marginals
class BernoulliMarginals:
    """Independent per-column marginals of the training vectors (see the module docstring)."""

    def __init__(self) -> None:
        self.schema: EHRSchema | None = None
        self.probabilities: dict[str, np.ndarray] = {}
        self.shares: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}

    def fit(self, train_vectors: np.ndarray, schema: EHRSchema) -> BernoulliMarginals:
        """Learns prevalences, category shares and the empirical age and admission values from ``train_vectors``."""
        array = _check_vectors(train_vectors, schema, "train_vectors")
        self.schema = schema
        self.probabilities, self.shares, self.values = {}, {}, {}
        for group in schema.groups:
            block = array[:, schema.slices[group.name]]
            if group.kind in ZERO_ONE_KINDS and not np.isin(block, (0.0, 1.0)).all():
                raise ValueError(f"train_vectors: the {group.kind} group {group.name!r} must hold only 0 and 1")
            if group.kind in ("binary", "multi_hot"):
                self.probabilities[group.name] = block.mean(axis=0, dtype=np.float64)
            elif group.kind == "one_hot":
                if not (block.sum(axis=1) == 1).all():
                    raise ValueError(f"train_vectors: every row needs exactly one 1 in the one-hot group "
                                     f"{group.name!r}")
                self.shares[group.name] = block.mean(axis=0, dtype=np.float64)
            else:
                self.values[group.name] = block[:, 0].copy()
        return self

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` records (float32, the schema layout); the same ``seed`` gives the same records."""
        if self.schema is None:
            raise ValueError("BernoulliMarginals.sample needs fit() first")
        if n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        rng = np.random.default_rng(seed)
        schema = self.schema
        out = np.zeros((n, schema.dim), dtype=np.float32)
        rows = np.arange(n)
        for group in schema.groups:
            where = schema.slices[group.name]
            if group.name in self.probabilities:
                probabilities = self.probabilities[group.name].astype(np.float32)
                for start in range(0, n, SAMPLE_CHUNK_ROWS):  # bounded memory: 8,192 rows of uniforms at a time
                    stop = min(start + SAMPLE_CHUNK_ROWS, n)
                    draws = rng.random((stop - start, group.width), dtype=np.float32)
                    out[start:stop, where] = draws < probabilities
            elif group.name in self.shares:
                out[rows, where.start + rng.choice(group.width, size=n, p=self.shares[group.name])] = 1.0
            else:
                out[:, where.start] = rng.choice(self.values[group.name], size=n)
        return out


# ---------------------------------------------------------------------------------------------- EDM sampling
def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels: ``steps`` values from ``sigma_max`` down to ``sigma_min``, evenly spaced in sigma^(1/rho),
    then a final 0 (float64, ``steps + 1`` values)."""
    import torch

    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    top, bottom = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (top + ramp * (bottom - top)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def heun_sample(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                sigmas: torch.Tensor) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Euler steps of dx/dsigma = (x - D(x; sigma)) /
    sigma with Heun's correction, except on the last step to sigma = 0. ``noise`` is standard normal; the state is
    kept in float64; ``denoiser(x, sigma)`` takes a scalar sigma tensor."""
    import torch

    sigmas = sigmas.to(device=noise.device, dtype=torch.float64)
    x = noise.to(torch.float64) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - denoiser(x, sigma).to(torch.float64)) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        if sigma_next == 0:
            x = x_euler
            continue
        slope_next = (x_euler - denoiser(x_euler, sigma_next).to(torch.float64)) / sigma_next
        x = x + (sigma_next - sigma) * (slope + slope_next) / 2
    return x


def threshold_records(vectors: np.ndarray, continuous: list[int]) -> np.ndarray:
    """Sampler output -> record vectors: every column 0/1 at 0.5 except ``continuous`` ones, clipped to [0, 1]."""
    array = np.asarray(vectors, dtype=np.float32)
    out = (array >= 0.5).astype(np.float32)
    out[:, continuous] = np.clip(array[:, continuous], 0.0, 1.0)
    return out


def sample_ehrdiff(model: EHRDiffMLP, n: int, seed: int = 0, steps: int = 32, batch_size: int = 4096,
                   device: str | torch.device | None = None, rho: float = 7.0,
                   show_progress: bool = False) -> np.ndarray:
    """``n`` records (float32, the schema layout, thresholded as the module docstring says) from ``model`` with the
    deterministic Heun sampler; record i starts from the noise of ``record_generator(seed, i)``, so the result does
    not depend on ``batch_size`` (up to float rounding). ``device`` (default: the model's) receives the model."""
    import torch

    from ...sampling import record_generator

    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = torch.device(device) if device is not None else model.device
    config = model.config
    sigmas = karras_sigmas(steps, config.sigma_min, config.sigma_max, rho)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.to(device).eval()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype), sigma.to(dtype)).sample

    chunks = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc="EHRDiff sampling", disable=not show_progress):
                rows = range(start, min(start + batch_size, n))
                noise = torch.stack([torch.randn(config.data_dim, generator=record_generator(seed, i))
                                     for i in rows]).to(device)
                chunks.append(heun_sample(denoise, noise, sigmas).float().cpu().numpy())
    finally:
        model.train(was_training)
    return threshold_records(np.concatenate(chunks), list(config.continuous_columns))


# ---------------------------------------------------------------------------------------------- EDM training
def edm_loss(model: EHRDiffMLP, batch: torch.Tensor, generator: torch.Generator, p_mean: float = -1.2,
             p_std: float = 1.2) -> torch.Tensor:
    """EDM's training loss on ``batch``: ln sigma ~ N(p_mean, p_std^2) per row, lambda(sigma)-weighted squared error
    of D(x + sigma n; sigma) against x, averaged over rows and columns."""
    import torch

    from ...models.ehrdiff_baseline import edm_loss_weight

    rows = batch.shape[0]
    sigma = (p_mean + p_std * torch.randn(rows, generator=generator, device=batch.device, dtype=batch.dtype)).exp()
    noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    denoised = model(batch + sigma[:, None] * noise, sigma).sample
    weight = edm_loss_weight(sigma, model.config.sigma_data)
    return (weight[:, None] * (denoised - batch) ** 2).mean()


def train_ehrdiff(
    train_vectors: np.ndarray,
    schema: EHRSchema,
    steps: int = 4000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    model_config: Mapping[str, Any] | None = None,
    ema_decay: float | None = 0.995,
    warmup_steps: int = 100,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> EHRDiffMLP:
    """Trains an :class:`EHRDiffMLP` on ``train_vectors`` (the schema layout) and returns it in eval mode, holding
    the EMA weights when ``ema_decay`` is set. ``model_config`` overrides the network's widths and noise constants
    (default: :meth:`EHRDiffMLP.cpu_config`; :meth:`EHRDiffMLP.ehrdiff_config` has EHRDiff's widths). AdamW, linear
    warm-up then cosine decay of the learning rate, shuffled epochs; ``seed`` fixes the initial weights, the batches
    and the noise."""
    import torch

    from ...models.ehrdiff_baseline import EHRDiffMLP

    array = _check_vectors(train_vectors, schema, "train_vectors")
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    config = {**EHRDiffMLP.cpu_config(schema.dim), **dict(model_config or {})}
    config.update(data_dim=schema.dim, continuous_columns=continuous_columns(schema))
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EHRDiffMLP(**config)
    model.to(device).train()
    data = torch.from_numpy(array).to(device)
    batch_size = min(batch_size, len(data))
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    parameters = list(model.parameters())
    averaged = [p.detach().clone() for p in parameters] if ema_decay is not None else None
    logger.info("EHRDiff baseline: %d parameters, %d rows x %d columns, %d steps of batch %d on %s",
                sum(p.numel() for p in parameters), len(data), schema.dim, steps, batch_size, device)
    log_every = max(1, steps // 10)
    order = torch.randperm(len(data), generator=generator, device=device)
    position, running = 0, 0.0
    bar = tqdm(range(steps), desc="EHRDiff training", disable=not show_progress)
    for step in bar:
        if position + batch_size > len(data):
            order, position = torch.randperm(len(data), generator=generator, device=device), 0
        batch = data[order[position : position + batch_size]]
        position += batch_size
        loss = edm_loss(model, batch, generator, p_mean, p_std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if averaged is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, parameter in zip(averaged, parameters):
                    average.lerp_(parameter, 1.0 - decay)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            count = (step % log_every) + 1
            logger.info("EHRDiff step %d/%d: loss %.4f", step + 1, steps, running / count)
            bar.set_postfix(loss=f"{running / count:.4f}")
            running = 0.0
    if averaged is not None:
        with torch.no_grad():
            for parameter, value in zip(parameters, averaged):
                parameter.copy_(value)
    return model.eval()


# ---------------------------------------------------------------------------------------------- one evaluation run
BASELINES = ("bernoulli", "train", "ehrdiff")
HOLDOUT_DROPPED = ("--baselines: 'holdout' is no longer a baseline: fidelity is scored against the whole holdout, so "
                   "half of it is no independent ceiling; use 'train' (real train rows, the reference)")


def baseline_vectors(names: list[str], real: RealData, n: int, seed: int, ehrdiff_steps: int = 4000,
                     device: str = "cpu", show_progress: bool = True) -> dict[str, np.ndarray]:
    """The named baselines' records, ``n`` each, fitted on the whole train split as the model was; the real train
    rows reference has min(``n``, train size) rows (a smaller train split is scored at its own size, with a warning,
    since CMD, Wasserstein and pair r all depend on the sample size)."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "bernoulli":
            out[name] = BernoulliMarginals().fit(real.train_all, real.schema).sample(n, seed)
        elif name == "train":
            if n > len(real.train_all):
                logger.warning("the real train rows reference has %d rows, fewer than the %d records of the other "
                               "sets; size-dependent figures (CMD, Wasserstein, pair r) are not comparable in its "
                               "column", len(real.train_all), n)
            out[name] = real.train_sample(n, seed)
        elif name == "ehrdiff":
            model = train_ehrdiff(real.train_all, real.schema, steps=ehrdiff_steps, seed=seed, device=device,
                                  show_progress=show_progress)
            out[name] = sample_ehrdiff(model, n, seed=seed, device=device, show_progress=show_progress)
        elif name == "holdout":
            raise ValueError(HOLDOUT_DROPPED)
        else:
            raise ValueError(f"--baselines: unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return out
