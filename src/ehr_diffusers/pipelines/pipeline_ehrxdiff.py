"""Previous chest X-ray + the EHR events since it -> the predicted next chest X-ray (EHRXDiff, arXiv 2409.07012).

The previous image is encoded once: its VAE latent (concatenated to the noisy latent in "hybrid" conditioning, and
given to the fusion adapter as tokens) and, when the pipeline has one, its image-encoder tokens. The events (text, one
per event, or precomputed per-event embeddings) go through the event encoder; the fusion adapter turns all of it into
the UNet's cross-attention context. DDIM then denoises a latent from noise, and the VAE decodes it.

Guidance follows diffusers: ``guidance_scale`` g > 1 mixes eps = eps_null + g (eps_events - eps_null), where the null
prediction has the same previous image and *no events* (the context the model learned under condition dropout), so
guidance strengthens exactly what the events change. The original never trains a null context and runs unguided.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPVisionModel

from ..data.cxr.events import TIME_SUFFIX
from ..models.event_encoder import EventEncoderModel, pad_events
from ..models.fusion_adapter import FusionAdapterModel
from ..text.embed import SentenceEmbedder
from .pipeline_utils import RemoteCodePipelineMixin, check_callback_inputs, check_callback_outputs

logger = logging.getLogger(__name__)

CONDITIONINGS = ("hybrid", "cross_attention")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


@dataclass
class EHRXDiffPipelineOutput(BaseOutput):
    """``images``: the predicted next images (PIL list, numpy (n, H, W, C) in [0, 1], tensor (n, C, H, W) in [0, 1],
    or the latents); ``n`` is the number of previous images times ``num_images_per_prompt``, image-major."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class EHRXDiffCondition:
    """What the denoising loop needs of the previous image and its events, one row per previous image: the context
    with the events and without (the null context guidance steers from), the previous image's scaled latent, and the
    pooled event vectors with and without events (None unless the UNet takes them as its class embedding)."""

    context: torch.Tensor
    null_context: torch.Tensor
    previous: torch.Tensor
    pooled: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None

    def repeat(self, times: int, dtype: torch.dtype) -> EHRXDiffCondition:
        """Each row ``times`` times (``num_images_per_prompt``), in ``dtype``."""
        return EHRXDiffCondition(*(None if value is None else value.repeat_interleave(times, dim=0).to(dtype)
                                   for value in (self.context, self.null_context, self.previous, self.pooled,
                                                 self.null_pooled)))


def image_encoder_pixels(pixels: torch.Tensor, image_encoder: CLIPVisionModel) -> torch.Tensor:
    """Pixels in [-1, 1] -> the image encoder's size and channels (the channel mean repeated), as training feeds it.
    The encoders trained here see [-1, 1]; a pretrained CLIP's own mean/std normalisation is not applied."""
    size = image_encoder.config.image_size
    image = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False)
    if image_encoder.config.num_channels != image.shape[1]:
        image = image.mean(dim=1, keepdim=True).expand(-1, image_encoder.config.num_channels, -1, -1)
    return image


def split_event_text(text: str) -> tuple[str, float | None]:
    """An event as ``prepare-cxr`` renders it ("..., time -3.5 h") -> its content (what is embedded) and its hours
    before the target study; a text without the time suffix keeps its content and has no time."""
    found = re.search(TIME_SUFFIX, text)
    if found is None:
        return text, None
    return text[:found.start()], float(found.group(0)[len(", time "):-len(" h")])


class EHRXDiffPipeline(RemoteCodePipelineMixin, DiffusionPipeline):
    r"""Predicts the next chest X-ray of a patient from the previous one and the EHR events in between.

    A saved folder loads with ``EHRXDiffPipeline.from_pretrained(folder)`` and with
    ``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

    Args:
        vae ([`AutoencoderKL`]): the image latent space (Cheff's chest X-ray VAE in the paper configuration).
        unet ([`UNet2DConditionModel`]): the denoiser; it takes ``2 x latent channels`` with "hybrid" conditioning
            (noisy latent and previous latent concatenated) and the latent channels with "cross_attention".
        scheduler ([`DDIMScheduler`]): scaled-linear betas 0.0015 -> 0.0295 over 1,000 steps, as the original.
        event_encoder ([`EventEncoderModel`]): per-event embeddings -> per-event tokens.
        fusion_adapter ([`FusionAdapterModel`]): event, image and VAE tokens -> the UNet's context.
        image_encoder ([`~transformers.CLIPVisionModel`], *optional*): tokens of the previous image for the context.
        event_embedder ([`SentenceEmbedder`], *optional*): embeds event texts; its width must be the event encoder's
            ``event_dim``. Without it, pass ``event_embeddings``.
        conditioning (`str`, *optional*): "hybrid" or "cross_attention"; default: read from the UNet's input width.
        residual_scale (`float`, *optional*): set when the UNet diffuses the change from the previous image's latent
            (times this scale, which gives it unit variance on the training split) rather than the target's latent;
            the prediction is then the previous latent plus the sampled change over the scale. Needs "hybrid".
    """

    model_cpu_offload_seq = "event_embedder->image_encoder->event_encoder->fusion_adapter->unet->vae"
    _optional_components = ["image_encoder", "event_embedder"]
    _callback_tensor_inputs = ["latents", "context", "null_context"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        event_encoder: EventEncoderModel,
        fusion_adapter: FusionAdapterModel,
        image_encoder: CLIPVisionModel | None = None,
        event_embedder: SentenceEmbedder | None = None,
        conditioning: str | None = None,
        residual_scale: float | None = None,
    ):
        super().__init__()
        channels = vae.config.latent_channels
        if conditioning is None:
            conditioning = "hybrid" if unet.config.in_channels == 2 * channels else "cross_attention"
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        expected = 2 * channels if conditioning == "hybrid" else channels
        if unet.config.in_channels != expected or unet.config.out_channels != channels:
            raise ValueError(f"a UNet with in_channels {unet.config.in_channels} and out_channels "
                             f"{unet.config.out_channels} fits neither conditioning with a {channels}-channel VAE: "
                             f"hybrid needs in_channels {2 * channels}, cross_attention {channels}, and out_channels "
                             f"{channels} (conditioning asked: {conditioning})")
        if event_embedder is not None and event_embedder.dim != event_encoder.config.event_dim:
            raise ValueError(f"the event embedder makes {event_embedder.dim}-d embeddings but the event encoder takes "
                             f"{event_encoder.config.event_dim}-d ones")
        if (fusion_adapter.config.image_dim is None) != (image_encoder is None):
            raise ValueError("the fusion adapter " + ("takes" if image_encoder is None else "takes no")
                             + " image-encoder tokens, but the pipeline " + ("has no" if image_encoder is None
                                                                             else "has an") + " image_encoder")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, event_encoder=event_encoder,
                              fusion_adapter=fusion_adapter, image_encoder=image_encoder,
                              event_embedder=event_embedder)
        if residual_scale is not None and (conditioning != "hybrid" or not residual_scale > 0):
            raise ValueError(f"residual_scale {residual_scale!r} needs hybrid conditioning and a positive value")
        self.register_to_config(conditioning=conditioning, residual_scale=residual_scale)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        gray = vae.config.in_channels == 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bilinear",
                                                 do_convert_grayscale=gray, do_convert_rgb=not gray)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ inputs
    def preprocess_images(self, prev_image: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """PIL images, numpy arrays (uint8, or float in [0, 1]; (H, W) or (H, W, C)) or tensors ((C, H, W) or
        (B, C, H, W) in [0, 1]) -> (B, vae channels, S, S) in [-1, 1], S the VAE's ``sample_size``. Another size is
        resized, with a warning: the model only knows its training resolution."""
        images = list(prev_image) if isinstance(prev_image, (list, tuple)) else [prev_image]
        if isinstance(prev_image, torch.Tensor) and prev_image.ndim == 4:
            images = list(prev_image)
        if isinstance(prev_image, np.ndarray) and prev_image.ndim == 4:
            images = list(prev_image)
        if not images:
            raise ValueError("prev_image is empty: pass one image or a list of images")
        converted = []
        for index, image in enumerate(images):
            if isinstance(image, torch.Tensor):  # (C, H, W) -> the (H, W, C) array the numpy path takes
                if image.ndim != 3 or image.shape[0] not in (1, 3):
                    raise ValueError(f"prev_image[{index}]: a tensor must be (C, H, W) with 1 or 3 channels, got "
                                     f"{tuple(image.shape)}")
                image = image.detach().float().cpu().permute(1, 2, 0).numpy()
            if isinstance(image, np.ndarray):
                if image.ndim == 3 and image.shape[-1] == 1:
                    image = image[..., 0]
                if image.dtype != np.uint8:
                    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                        raise ValueError(f"prev_image[{index}]: float values must lie in [0, 1] (diffusers' image "
                                         "convention)")
                    image = (image * 255).round().astype(np.uint8)
                image = PIL.Image.fromarray(image)
            elif not isinstance(image, PIL.Image.Image):
                raise ValueError(f"prev_image[{index}] is a {type(image).__name__}; pass a PIL image, a numpy array "
                                 "or a tensor")
            converted.append(image)
        size = self.vae.config.sample_size
        sizes = sorted({image.size for image in converted if image.size != (size, size)})
        if sizes:
            logger.warning("prev_image of size %s resized to the model's %d x %d", sizes, size, size)
        return self.image_processor.preprocess(converted, height=size, width=size)

    def embed_events(
        self,
        events: Sequence[str] | Sequence[Sequence[str]] | None,
        event_embeddings: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor] | None,
        event_hours: Sequence[float] | Sequence[Sequence[float]] | None,
        batch_size: int,
    ) -> tuple[list[torch.Tensor], list[np.ndarray | None]]:
        """One ``(n_i, event_dim)`` embedding array and one hours array (or None) per previous image."""
        if events is not None and event_embeddings is not None:
            raise ValueError("pass either events or event_embeddings, not both")
        if events is None and event_embeddings is None:
            logger.info("no events given: predicting from the null (no events) context")
            embeddings = [torch.zeros(0, self.event_encoder.config.event_dim)] * batch_size
            return embeddings, [None] * batch_size
        if events is not None:
            per_image = [events] if (not events or isinstance(events[0], str)) else list(events)
            if len(per_image) != batch_size:
                raise ValueError(f"events holds {len(per_image)} event lists for {batch_size} previous images")
            if self.event_embedder is None:
                raise ValueError("events as text need an event embedder and this pipeline has none: load it with "
                                 "from_pretrained(..., event_embedder=load_embedder(spec)) or pass event_embeddings")
            embeddings, parsed_hours = [], []
            for index, texts in enumerate(per_image):
                if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
                    raise ValueError(f"events[{index}] must be a list of strings (one event each)")
                parts = [split_event_text(text) for text in texts]
                vectors = self.event_embedder.encode([content for content, _ in parts]).cpu()
                # the training data stores event vectors in float16: round the same way
                embeddings.append(vectors.to(torch.float16).float())
                times = [hours for _, hours in parts]
                parsed_hours.append(None if any(hours is None for hours in times) else np.asarray(times, np.float32))
        else:
            if isinstance(event_embeddings, (np.ndarray, torch.Tensor)) and event_embeddings.ndim == 2:
                event_embeddings = [event_embeddings]
            embeddings = [torch.as_tensor(np.asarray(item, dtype=np.float32)) if not torch.is_tensor(item)
                          else item.detach().float().cpu() for item in event_embeddings]
            if len(embeddings) != batch_size:
                raise ValueError(f"event_embeddings holds {len(embeddings)} arrays for {batch_size} previous images")
            dim = self.event_encoder.config.event_dim
            for index, item in enumerate(embeddings):
                if item.ndim != 2 or item.shape[1] != dim:
                    raise ValueError(f"event_embeddings[{index}] has shape {tuple(item.shape)}; the event encoder "
                                     f"takes (n_events, {dim})")
                if not torch.isfinite(item).all():
                    raise ValueError(f"event_embeddings[{index}] holds NaN or infinite values")
            parsed_hours = [None] * batch_size
        if event_hours is not None:
            per_image = [event_hours] if batch_size == 1 and (len(event_hours) == 0 or np.ndim(event_hours[0]) == 0) \
                else list(event_hours)
            if len(per_image) != batch_size:
                raise ValueError(f"event_hours holds {len(per_image)} lists for {batch_size} previous images")
            parsed_hours = [np.asarray(hours, dtype=np.float32) for hours in per_image]
            for index, (hours, item) in enumerate(zip(parsed_hours, embeddings)):
                if hours.shape != (len(item),):
                    raise ValueError(f"event_hours[{index}] holds {hours.size} values for {len(item)} events")
        for index, item in enumerate(embeddings):
            if len(item) == 0 and (events is not None or event_embeddings is not None):
                logger.info("previous image %d has no events: the null (no events) context", index)
        return embeddings, parsed_hours

    @torch.no_grad()
    def encode_condition(
        self,
        pixels: torch.Tensor,
        embeddings: list[torch.Tensor],
        hours: list[np.ndarray | None],
    ) -> EHRXDiffCondition:
        """The context with the events, the null context (same image, no events), the previous image's scaled
        latent and, for a UNet with a class embedding, the pooled events with and without them."""
        device = self._execution_device
        maximum = self.event_encoder.config.max_events
        padded, times, mask, dropped = pad_events(embeddings, hours, max_events=maximum)
        if dropped:
            logger.warning("%d event(s) beyond the model's %d per interval dropped: the most recent are kept",
                           dropped, maximum)
        vae_dtype = self.vae.dtype
        moments = self.vae.encode(pixels.to(device=device, dtype=vae_dtype)).latent_dist
        latent = moments.mode()
        image_tokens = None
        if self.image_encoder is not None:
            image = image_encoder_pixels(pixels, self.image_encoder)
            image_tokens = self.image_encoder(pixel_values=image.to(device=device, dtype=self.image_encoder.dtype)
                                              ).last_hidden_state
        dtype = self.event_encoder.dtype
        events = self.event_encoder(padded.to(device=device, dtype=dtype), mask.to(device), times.to(device))
        empty = self.event_encoder(padded.new_zeros(len(embeddings), 0, padded.shape[-1]).to(device=device,
                                                                                             dtype=dtype))
        vae_tokens = latent if self.fusion_adapter.config.vae_channels is not None else None
        context = self.fusion_adapter(events.tokens, events.mask, image_tokens, vae_tokens)
        null_context = self.fusion_adapter(empty.tokens, empty.mask, image_tokens, vae_tokens)
        condition = EHRXDiffCondition(context, null_context, latent * self.vae.config.scaling_factor)
        if self.unet.config.class_embed_type == "projection":  # the pooled events also enter the time embedding
            condition.pooled, condition.null_pooled = events.pooled, empty.pooled
        return condition

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prev_image: ImageInput | Sequence[ImageInput],
        events: Sequence[str] | Sequence[Sequence[str]] | None = None,
        event_embeddings: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor] | None = None,
        event_hours: Sequence[float] | Sequence[Sequence[float]] | None = None,
        num_inference_steps: int = 100,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> EHRXDiffPipelineOutput | tuple:
        r"""Predicts the next image of each previous image.

        Args:
            prev_image: the previous chest X-ray(s): PIL, numpy or tensor, one or a batch.
            events: the events since each previous image, as text (one string per event, oldest first; "..., time
                -3.5 h" as ``prepare-cxr`` renders them gives each event its time): a list of strings for one image,
                a list of lists for a batch. An empty list means no events (the null context).
            event_embeddings: instead of ``events``, per-event embeddings ``(n_events, event_dim)`` per image, as the
                ``prepare-cxr`` dataset holds them (any length; padded and masked here).
            event_hours: hours before the target study of each event (negative), per image.
            num_inference_steps: DDIM steps.
            eta: DDIM's eta (1 is ancestral DDPM-like sampling, 0 deterministic).
            guidance_scale: classifier-free guidance against the no-events context; 1 or less turns it off.
            num_images_per_prompt: predictions per previous image.
            generator: one generator, or one per predicted image.
            latents: starting noise ``(n, latent channels, s, s)``.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return an :class:`EHRXDiffPipelineOutput` rather than a tuple.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers' pipelines; the tensors are
                among ``latents``, ``context`` and ``null_context``.

        Examples:

        ```py
        >>> from ehr_diffusers import EHRXDiffPipeline
        >>> pipe = EHRXDiffPipeline.from_pretrained("ehr-diffusers-demo/cxr-model")
        >>> image = pipe(prev_image, events=["furosemide 40 mg IV, time -20.0 h"], guidance_scale=2.0).images[0]
        ```
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(num_inference_steps, eta, guidance_scale, num_images_per_prompt, output_type,
                          callback_on_step_end_tensor_inputs)
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        device = self._execution_device

        pixels = self.preprocess_images(prev_image)
        embeddings, hours = self.embed_events(events, event_embeddings, event_hours, pixels.shape[0])
        condition = self.encode_condition(pixels, embeddings, hours).repeat(num_images_per_prompt, self.unet.dtype)
        context, null_context, previous = condition.context, condition.null_context, condition.previous
        pooled, null_pooled = condition.pooled, condition.null_pooled
        n_images = context.shape[0]
        if isinstance(generator, list) and len(generator) != n_images:
            raise ValueError(f"generator is a list of {len(generator)} generators for {n_images} images; pass one "
                             "per image (previous images x num_images_per_prompt) or a single generator")
        size = self.vae.config.sample_size // self.vae_scale_factor
        shape = (n_images, self.vae.config.latent_channels, size, size)
        dtype = self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                if self.config.conditioning == "hybrid":
                    model_input = torch.cat([model_input, previous], dim=1)
                states, labels = context, pooled
                if self.do_classifier_free_guidance:
                    model_input = torch.cat([model_input, model_input])
                    states = torch.cat([null_context, context])
                    labels = None if pooled is None else torch.cat([null_pooled, pooled])
                noise_pred = self.unet(model_input, t, encoder_hidden_states=states, class_labels=labels).sample
                if self.do_classifier_free_guidance:
                    noise_null, noise_events = noise_pred.chunk(2)
                    noise_pred = noise_null + self.guidance_scale * (noise_events - noise_null)
                latents = self.scheduler.step(noise_pred, t, latents, eta=eta, generator=generator).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    check_callback_outputs(callback_outputs, {"latents": latents, "context": context,
                                                              "null_context": null_context})
                    latents = callback_outputs.pop("latents", latents)
                    context = callback_outputs.pop("context", context)
                    null_context = callback_outputs.pop("null_context", null_context)
                progress_bar.update()

        if self.config.get("residual_scale") is not None:  # the sampled change, added to the previous latent
            latents = previous + latents / self.config.residual_scale
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return EHRXDiffPipelineOutput(images=images)

    def check_inputs(
        self,
        num_inference_steps: int,
        eta: float,
        guidance_scale: float,
        num_images_per_prompt: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
