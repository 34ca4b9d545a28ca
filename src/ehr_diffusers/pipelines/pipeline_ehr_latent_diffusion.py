"""Text -> synthetic patient records: latent diffusion over the EHR autoencoder's latent space.

A prompt ("65 year old woman with heart failure and CKD") is embedded by the text embedder; the denoiser generates a
latent from noise with the scheduler, guided towards the prompt (classifier-free guidance with the *learned* null
condition the model was trained with); the autoencoder decodes the latent into a patient vector, by default drawing
each code from its Bernoulli probability and each one-hot field from its softmax with the caller's generator
(``decode_mode="sample"``, saved in the pipeline config), or by per-code thresholds calibrated on the training data
(``"threshold"``); the schema turns vectors into records.

Guidance follows diffusers: ``guidance_scale`` g mixes eps = eps_null + g (eps_cond - eps_null), which is the
HealthForge form eps = (1 + s) eps_cond - s eps_null with s = g - 1. Conditional and null predictions come from one
batched pass. Without a prompt the pipeline samples unconditionally, from the null condition alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..data.ehr.schema import EHRSchema
from ..models.ehr_autoencoder import EHRAutoencoderModel
from ..models.ehr_denoiser import EHRDenoiserModel
from ..schedulers.scheduling_logsnr_cosine import LogSNRCosineScheduler
from ..text.embed import SentenceEmbedder
from .pipeline_utils import RemoteCodePipelineMixin, check_callback_inputs, check_callback_outputs

OutputType = Literal["records", "pd", "np", "pt", "latent"]
OUTPUT_TYPES = ("records", "pd", "np", "pt", "latent")
DecodeMode = Literal["sample", "threshold"]
DECODE_MODES = ("sample", "threshold")


@dataclass
class EHRLatentDiffusionPipelineOutput(BaseOutput):
    """Generated patients.

    Args:
        records: the output in the requested ``output_type``: a list of record dicts ("records"), a pandas DataFrame
            ("pd"), the decoded schema vectors as a numpy array ("np") or tensor ("pt"), or the generated
            (normalised) latents ("latent").
        vectors: the decoder's schema vectors, float32 ``(n, schema.dim)`` (None for "latent"); the records are these
            decoded, with age and counts rounded to whole numbers.
        prompts: the prompt each record was generated from, in record order (None for unconditional records or
            records made from ``prompt_embeds``).
    """

    records: list[dict[str, Any]] | Any
    vectors: np.ndarray | None
    prompts: list[str | None]


class EHRLatentDiffusionPipeline(RemoteCodePipelineMixin, DiffusionPipeline):
    r"""Generates synthetic MIMIC-IV-shaped patient records from text.

    A saved folder loads with ``EHRLatentDiffusionPipeline.from_pretrained(folder)`` and with
    ``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (see
    :class:`~ehr_diffusers.pipelines.pipeline_utils.RemoteCodePipelineMixin`).

    Args:
        autoencoder ([`EHRAutoencoderModel`]): maps record vectors to latents and back, with the latent statistics
            and calibrated decoding thresholds fitted on the training split.
        denoiser ([`EHRDenoiserModel`]): predicts the noise (or v, or x) of a latent at a noise level, given a
            condition.
        scheduler ([`LogSNRCosineScheduler`]): the logSNR-cosine schedule and its samplers.
        text_embedder ([`SentenceEmbedder`], *optional*): embeds prompts; it is saved as None when left out, and can
            be passed at load time (``from_pretrained(dir, text_embedder=...)``) or replaced by ``prompt_embeds``.
        schema (`dict`, *optional*): the record schema (``EHRSchema.to_dict()``) the autoencoder was trained on;
            saved in ``model_index.json`` so that the pipeline decodes records on its own. Default: the one the
            autoencoder's config carries.
        decode_mode (`str`, defaults to "sample"): how latents become records unless a call says otherwise: "sample"
            (Bernoulli draws for codes and binary fields, softmax draws for one-hot fields, from the generator) or
            "threshold" (the calibrated per-code thresholds and the most likely category; deterministic). Sampling
            keeps the real spread of codes per record (BENCHMARKS.md).
    """

    model_cpu_offload_seq = "text_embedder->denoiser->autoencoder"
    _optional_components = ["text_embedder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        autoencoder: EHRAutoencoderModel,
        denoiser: EHRDenoiserModel,
        scheduler: LogSNRCosineScheduler,
        text_embedder: SentenceEmbedder | None = None,
        schema: dict[str, Any] | None = None,
        decode_mode: str = "sample",
    ):
        super().__init__()
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        if autoencoder.config.latent_dim != denoiser.config.latent_dim:
            raise ValueError(f"autoencoder latent_dim ({autoencoder.config.latent_dim}) and denoiser latent_dim "
                             f"({denoiser.config.latent_dim}) differ")
        if text_embedder is not None and text_embedder.dim != denoiser.config.condition_dim:
            raise ValueError(f"text_embedder makes {text_embedder.dim}-d embeddings, the denoiser was trained on "
                             f"condition_dim {denoiser.config.condition_dim}")
        if denoiser.config.prediction_type != scheduler.config.prediction_type:
            raise ValueError(f"the denoiser predicts {denoiser.config.prediction_type!r} but the scheduler expects "
                             f"{scheduler.config.prediction_type!r}; build the scheduler with "
                             f"prediction_type={denoiser.config.prediction_type!r}")
        if isinstance(schema, EHRSchema):
            schema = schema.to_dict()
        if schema is None and autoencoder.schema() is not None:  # e.g. EHRLatentDiffusionPipeline(**pipe.components)
            schema = autoencoder.schema().to_dict()
        parsed = None if schema is None else EHRSchema.from_dict(schema)
        if parsed is not None:
            autoencoder.check_schema(parsed)
        self.register_modules(autoencoder=autoencoder, denoiser=denoiser, scheduler=scheduler,
                              text_embedder=text_embedder)
        self.register_to_config(schema=schema, decode_mode=decode_mode)
        self._schema = parsed

    def __repr__(self) -> str:
        """The config without the schema's full vocabulary (thousands of codes), which ``model_index.json`` holds."""
        config = {key: value for key, value in self.config.items() if key != "schema"}
        config["schema"] = repr(self._schema) if self._schema is not None else None
        return f"{self.__class__.__name__} {json.dumps(config, indent=2, sort_keys=True, default=str)}\n"

    @property
    def schema(self) -> EHRSchema:
        """The record schema; generating records (not vectors) needs it."""
        if self._schema is None:
            raise ValueError("this pipeline has no schema: pass schema=EHRSchema.load(dataset_dir).to_dict() when "
                             "building it, or use output_type 'np', 'pt' or 'latent'")
        return self._schema

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0 and self._conditional

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ conditions
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_records_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
        """Condition and null-condition embeddings, one row per record, and the prompt of each record.

        The null condition is the denoiser's learned ``null_condition`` unless a negative prompt replaces it. With
        neither a prompt nor ``prompt_embeds`` the condition is the learned null condition itself (unconditional
        samples, guided away from the negative prompt when there is one).
        """
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt]
        if prompt is not None:
            if not prompt or not all(isinstance(text, str) for text in prompt):
                raise ValueError("prompt must be a string or a non-empty list of strings")
            prompt_embeds = self._embed(prompt, "prompt")
        if negative_prompt is not None:
            negative_prompt_embeds = self._embed(negative_prompt, "negative_prompt")
        dtype = self.denoiser.dtype
        if prompt_embeds is None:
            count = 1
        else:
            prompt_embeds = self._check_embeds(prompt_embeds, "prompt_embeds").to(device=device, dtype=dtype)
            count = prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            negative = self.denoiser.null_condition_embeds(count).to(device=device, dtype=dtype)
        else:
            negative = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds").to(device=device,
                                                                                               dtype=dtype)
            if negative.shape[0] == 1 and count > 1:
                negative = negative.expand(count, -1)
            if negative.shape[0] != count:
                raise ValueError(f"negative prompts ({negative.shape[0]}) must be one or as many as the prompts "
                                 f"({count})")
        condition = self.denoiser.null_condition_embeds(count).to(device=device, dtype=dtype) \
            if prompt_embeds is None else prompt_embeds
        records_prompts = [text for text in (prompt or [None] * count) for _ in range(num_records_per_prompt)]
        return (condition.repeat_interleave(num_records_per_prompt, dim=0),
                negative.repeat_interleave(num_records_per_prompt, dim=0), records_prompts)

    def _embed(self, texts: list[str], argument: str) -> torch.Tensor:
        if self.text_embedder is None:
            raise ValueError(f"{argument} needs a text embedder and this pipeline has none: load it with "
                             "from_pretrained(..., text_embedder=load_embedder(spec)) or pass prompt_embeds")
        return self.text_embedder.encode(texts)

    def _check_embeds(self, embeds: torch.Tensor, argument: str) -> torch.Tensor:
        expected = self.denoiser.config.condition_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[1] != expected:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{argument} must be a tensor of shape (n, {expected}) (the denoiser's condition_dim), "
                             f"got {shape}")
        return embeds

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_records_per_prompt: int = 1,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        decode_mode: DecodeMode | None = None,
        output_type: OutputType = "records",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> EHRLatentDiffusionPipelineOutput | tuple:
        r"""Generates ``num_records_per_prompt`` records for each prompt (or unconditionally without one).

        Args:
            prompt: text(s) describing the patients to generate; None generates unconditionally.
            num_records_per_prompt: records per prompt (or in all, without a prompt).
            num_inference_steps: sampler steps of the default DPM-Solver++(2M); on the demo model 25 give records
                with the real number of codes per patient and 10 about one code fewer, at 40% of the time
                (BENCHMARKS.md).
            guidance_scale: classifier-free guidance g (HealthForge's s = g - 1); 1 or less turns it off.
            negative_prompt: text(s) to guide away from, in place of the learned null condition.
            prompt_embeds / negative_prompt_embeds: precomputed condition embeddings ``(n_prompts, condition_dim)``.
            generator: one generator, or one per record for per-record reproducibility.
            latents: starting noise ``(n_records, latent_dim)``; drawn from ``generator`` when None.
            decode_mode: "sample" (Bernoulli and categorical draws from the decoder's probabilities, with
                ``generator``) or "threshold" (calibrated per-code thresholds, most likely category; deterministic);
                default: the pipeline's ``decode_mode``.
            output_type: "records", "pd", "np", "pt" or "latent".
            return_dict: return an :class:`EHRLatentDiffusionPipelineOutput` rather than a tuple.
            callback_on_step_end: called after each step as ``callback(pipe, step, timestep, callback_kwargs)``; it
                returns a dict whose tensors (from ``callback_on_step_end_tensor_inputs``) replace the current ones.
            callback_on_step_end_tensor_inputs: which tensors the callback gets (of ``_callback_tensor_inputs``).

        Examples:

        ```py
        >>> from ehr_diffusers import EHRLatentDiffusionPipeline
        >>> pipe = EHRLatentDiffusionPipeline.from_pretrained("ehr-diffusers-demo/model")
        >>> records = pipe("65 year old woman with heart failure and CKD", num_records_per_prompt=100).records
        ```
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        decode_mode = decode_mode or self.config.get("decode_mode", "sample")
        self.check_inputs(num_records_per_prompt, num_inference_steps, output_type, decode_mode,
                          callback_on_step_end_tensor_inputs)
        self._guidance_scale = guidance_scale
        self._conditional = any(value is not None for value in (prompt, prompt_embeds, negative_prompt,
                                                                negative_prompt_embeds))
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds, prompts = self.encode_prompt(
            prompt, device, num_records_per_prompt, prompt_embeds, negative_prompt, negative_prompt_embeds
        )
        n_records = prompt_embeds.shape[0]
        if isinstance(generator, list) and len(generator) != n_records:
            raise ValueError(f"generator is a list of {len(generator)} generators for {n_records} records; pass one "
                             "per record (num_records_per_prompt x prompts) or a single generator")
        latent_shape = (n_records, self.denoiser.config.latent_dim)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=self.denoiser.dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                condition = (torch.cat([negative_prompt_embeds, prompt_embeds]) if self.do_classifier_free_guidance
                             else prompt_embeds)
                logsnr = self.scheduler.logsnr(t).to(device=device, dtype=torch.float32)
                prediction = self.denoiser(model_input, logsnr, condition).sample.float()
                if self.do_classifier_free_guidance:
                    prediction_null, prediction_cond = prediction.chunk(2)
                    prediction = prediction_null + self.guidance_scale * (prediction_cond - prediction_null)
                latents = self.scheduler.step(prediction, t, latents, generator=generator).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    check_callback_outputs(callback_outputs, {"latents": latents, "prompt_embeds": prompt_embeds,
                                                              "negative_prompt_embeds": negative_prompt_embeds})
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        if output_type == "latent":
            records, vectors = latents, None
        else:
            vectors = self.decode_latents(latents, sample=decode_mode == "sample", generator=generator)
            records = self._format(vectors, output_type)
            vectors = vectors.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (records,)
        return EHRLatentDiffusionPipelineOutput(records=records, vectors=vectors, prompts=prompts)

    def check_inputs(
        self,
        num_records_per_prompt: int,
        num_inference_steps: int,
        output_type: str,
        decode_mode: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        if not isinstance(num_records_per_prompt, int) or num_records_per_prompt < 1:
            raise ValueError(f"num_records_per_prompt must be a positive integer, got {num_records_per_prompt!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Normalised latents -> schema vectors (float32), by the autoencoder's decoder and calibrated decoding."""
        latents = self.autoencoder.denormalize_latent(latents.to(self.autoencoder.dtype))
        logits = self.autoencoder.decode(latents)
        return self.autoencoder.to_vectors(logits, sample=sample, generator=generator).float()

    def _format(self, vectors: torch.Tensor, output_type: str) -> Any:
        if output_type == "pt":
            return vectors
        if output_type == "np":
            return vectors.cpu().numpy()
        records = self.schema.decode(vectors.cpu().numpy())
        if output_type == "pd":
            import pandas as pd

            return pd.DataFrame.from_records(records, columns=[group.name for group in self.schema.groups])
        return records

    # ------------------------------------------------------------------ tables
    def to_mimic_tables(
        self,
        records: list[dict[str, Any]],
        out: str | Path,
        file_format: Literal["csv.gz", "csv", "parquet"] = "csv.gz",
        seed: int = 0,
        overwrite: bool = False,
    ) -> dict[str, int]:
        """Writes records as a synthetic MIMIC-IV ``hosp/`` folder (patients, admissions, diagnoses_icd,
        d_icd_diagnoses) with synthetic ids and a README saying so; see
        :mod:`ehr_diffusers.data.ehr.synthetic_tables`."""
        from ..data.ehr.synthetic_tables import write_mimic_tables

        return write_mimic_tables(records, out, file_format=file_format, seed=seed, overwrite=overwrite)
