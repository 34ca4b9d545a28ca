"""Converts the released EHRXDiff weights into an ``EHRXDiffPipeline`` folder.

EHRXDiff (arXiv 2409.07012; code github.com/dek924/EHRXDiff; weights on the Hub as ``dek924/ehrxdiff`` and
``dek924/ehrxdiff_wnull``) is a latent diffusion model built on Cheff (github.com/saiboxx/chexray-diffusion), whose
weights ship as one state dict of the original ``LatentDiffusion``: a Lightning ``.ckpt`` (``state_dict`` inside), a
bare state dict, or the ``PyTorchModelHubMixin`` form (``model.safetensors`` + ``config.json``). Its groups map as
follows:

==========================================  ======================================================================
original keys                               component
==========================================  ======================================================================
``model.diffusion_model.*``                 ``unet``: ``UNet2DConditionModel`` (diffusers' own LDM converter)
``model_ema.*``                             ``unet`` instead, with ``use_ema`` (LitEma's dotless shadow names)
``first_stage_model.*``                     ``vae``: ``AutoencoderKL`` (diffusers' own LDM converter)
``cond_stage_model.autoencoder.*``          a second, frozen copy of the VAE: checked bit-identical, then dropped
``cond_stage_model.clip_img_encoder.*``     ``image_encoder``: transformers ``CLIPVisionModel`` (OpenAI layout)
``cond_stage_model.clip_tab_encoder.*``     ``event_encoder``: ``EventEncoderModel``, 1:1
``cond_stage_model.vae_projector/adaptor``  ``fusion_adapter``: ``FusionAdapterModel`` (``token_linear``)
``betas``, ``alphas_cumprod``, ... (12)     not weights: checked against the ``DDIMScheduler`` built from the config
==========================================  ======================================================================

Every key is accounted for: a key no rule maps, or a weight a component needs and the file lacks, is an error that
names the keys. The mapping is pure functions over state dicts (:func:`convert_ehrxdiff_state_dict`); only
:func:`save_ehrxdiff_pipeline` touches the disk, through a temporary sibling folder renamed at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import DataError
from ..io import atomic_directory, check_output_dir

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_META_KEYS = ("model_ema.decay", "model_ema.num_updates")
VAE_PREFIX = "first_stage_model."
VAE_COPY_PREFIX = "cond_stage_model.autoencoder."
IMAGE_ENCODER_PREFIX = "cond_stage_model.clip_img_encoder."
EVENT_ENCODER_PREFIX = "cond_stage_model.clip_tab_encoder."
FUSION_PREFIXES = ("cond_stage_model.vae_projector.", "cond_stage_model.adaptor.")
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# The original hard-codes these (encoders/modules.py): TabTransformerEmbedder(n_embed=1536, n_head=24, ...) and a
# ViT MLP of 4 x width. The head count cannot be read from the weights.
ORIGINAL_EVENT_HEADS = 24
SCHEDULE_RTOL = 1e-5
MAX_NAMED_KEYS = 10

Conditioning = Literal["cross_attention", "hybrid"]


class ConversionError(DataError):
    """The checkpoint or config does not match the EHRXDiff layout; the message names the keys."""


@dataclass
class ConvertedEHRXDiff:
    """What :func:`convert_ehrxdiff_state_dict` returns: the pipeline's components and how they were made.

    ``components`` holds ``vae``, ``unet``, ``scheduler``, ``event_encoder``, ``fusion_adapter`` and
    ``image_encoder``; ``key_counts`` how many original keys each group held; ``checks`` what was verified."""

    components: dict[str, Any]
    conditioning: Conditioning
    use_ema: bool
    key_counts: dict[str, int] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


def _name_keys(keys: Iterable[str]) -> str:
    """``'a', 'b', ... (N keys)``: the first few of ``keys`` and their count, for an error message."""
    keys = sorted(set(keys))
    shown = ", ".join(keys[:MAX_NAMED_KEYS]) + (", ..." if len(keys) > MAX_NAMED_KEYS else "")
    return f"{shown} ({len(keys)} key{'s' if len(keys) != 1 else ''})"


# ---------------------------------------------------------------------------------------------------------------
# reading the inputs


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The original state dict from a Lightning ``.ckpt`` (its ``state_dict``), a bare state dict file, a
    ``.safetensors`` file, or a Hub mixin folder holding ``model.safetensors``.

    Pickle files are read with ``weights_only=True``: a checkpoint that needs arbitrary code to unpickle is refused
    rather than run."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise ConversionError(f"--checkpoint {path}: a folder must hold model.safetensors (the Hub mixin form)")
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"--checkpoint {path}: not a readable safetensors file ({error})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line), None)
        if reason is None:  # not a pickle at all: random bytes, a truncated download
            raise ConversionError(f"--checkpoint {path}: not a torch checkpoint ({error})") from None
        raise ConversionError(
            f"--checkpoint {path}: torch.load(weights_only=True) refused it, since unpickling it would run code "
            f"({reason}). If you trust the file, extract its weights once in a separate "
            "environment, e.g. torch.save(torch.load(path, weights_only=False)['state_dict'], 'state_dict.pt'), "
            "and convert that file") from None
    except (RuntimeError, EOFError) as error:
        raise ConversionError(f"--checkpoint {path}: not a torch checkpoint ({error})") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ConversionError(f"--checkpoint {path}: holds neither a state dict of tensors nor a Lightning "
                              "checkpoint with one under 'state_dict'")
    return dict(loaded)


_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def resolve_interpolations(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with OmegaConf's absolute interpolations (``${context_dim}``, ``${model.params.x}``) replaced by
    the values they name, so that the original yml reads without OmegaConf. A value that is one interpolation takes
    the referenced node (of any type); one embedded in a string is formatted into it."""
    root = copy.deepcopy(dict(config))

    def lookup(path: str, seen: tuple[str, ...]) -> Any:
        if path in seen:
            raise ConversionError(f"config: interpolation cycle {' -> '.join((*seen, path))}")
        if not path or path.startswith(".") or ":" in path:
            raise ConversionError(f"config: interpolation ${{{path}}} is not supported (only absolute paths such as "
                                  "${model.params.context_dim}); write the value instead")
        node: Any = root
        for part in path.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConversionError(f"config: interpolation ${{{path}}} names no value in the config")
        return resolve(node, (*seen, path))

    def resolve(node: Any, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(node, Mapping):
            return {key: resolve(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value, seen) for value in node]
        if isinstance(node, str):
            whole = _INTERPOLATION.fullmatch(node.strip())
            if whole:
                return copy.deepcopy(lookup(whole[1].strip(), seen))
            return _INTERPOLATION.sub(lambda match: str(lookup(match[1].strip(), seen)), node)
        return node

    return resolve(root)


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Any of the original's config forms -> ``{"model": {"params": ...}, ...}`` with interpolations resolved: the
    yml (``model.params``), the mixin's ``config.json`` (the params dict itself, or under ``config``)."""
    config = dict(config)
    if "model" not in config and isinstance(config.get("config"), Mapping):
        config = dict(config["config"])
    if "model" not in config and "unet_config" in config:
        config = {"model": {"params": config}}
    params = config.get("model", {}).get("params") if isinstance(config.get("model"), Mapping) else None
    if not isinstance(params, Mapping):
        raise ConversionError("config: neither the original yml (model.params) nor its params dict (unet_config, "
                              "first_stage_config, cond_stage_config at the top)")
    config = resolve_interpolations(config)
    params = config["model"]["params"]
    missing = [name for name in ("unet_config", "first_stage_config", "cond_stage_config") if name not in params]
    if missing:
        raise ConversionError(f"config: model.params lacks {', '.join(missing)}")
    return config


def load_original_config(path: str | Path) -> dict[str, Any]:
    """The original config from its yml (``configs/EHRXDiff.yml``) or the mixin's ``config.json``, normalized
    (:func:`normalize_config`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConversionError(f"--config {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix in (".yml", ".yaml"):
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConversionError(f"--config {path}: not readable yml ({error})") from None
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConversionError(f"--config {path}: not readable json ({error}); the original yml needs a .yml or "
                                  ".yaml suffix") from None
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"--config {path}: holds no mapping")
    try:
        return normalize_config(loaded)
    except ConversionError as error:
        raise ConversionError(f"--config {path}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# pure checks and per-component mappings


def detect_conditioning(state_dict: Mapping[str, torch.Tensor], latent_channels: int | None = None) -> Conditioning:
    """``"hybrid"`` when the UNet's first conv takes the noisy latent concatenated with the previous image's latent
    (2 x latent channels), ``"cross_attention"`` when it takes the noisy latent alone.

    ``latent_channels`` defaults to the UNet's output channels (``out.2``), which predict noise in latent space."""
    first, last = UNET_PREFIX + "input_blocks.0.0.weight", UNET_PREFIX + "out.2.weight"
    if first not in state_dict:
        raise ConversionError(f"checkpoint lacks {first}, the UNet's first conv: not an EHRXDiff/LDM state dict")
    if latent_channels is None:
        if last not in state_dict:
            raise ConversionError(f"checkpoint lacks {last}, the UNet's last conv; pass latent_channels")
        latent_channels = int(state_dict[last].shape[0])
    in_channels = int(state_dict[first].shape[1])
    if in_channels == latent_channels:
        return "cross_attention"
    if in_channels == 2 * latent_channels:
        return "hybrid"
    raise ConversionError(f"{first} takes {in_channels} channels, neither the {latent_channels} latent channels "
                          f"(cross-attention) nor twice that (hybrid: the previous image's latent concatenated)")


def _partition(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict split into its groups; keys of no group fail, named."""
    prefixes = {"unet": UNET_PREFIX, "ema": EMA_PREFIX, "vae": VAE_PREFIX, "vae_copy": VAE_COPY_PREFIX,
                "image_encoder": IMAGE_ENCODER_PREFIX, "event_encoder": EVENT_ENCODER_PREFIX}
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*prefixes, "fusion_adapter", "schedule")}
    unmapped = []
    for key, value in state_dict.items():
        if key in SCHEDULE_BUFFERS:
            groups["schedule"][key] = value
        elif key.startswith(FUSION_PREFIXES):
            groups["fusion_adapter"][key] = value
        else:
            name = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
            if name is None:
                unmapped.append(key)
            else:
                groups[name][key] = value
    if unmapped:
        raise ConversionError(f"checkpoint holds keys no EHRXDiff component maps: {_name_keys(unmapped)}")
    return groups


def _load_strict(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], component: str,
                 original_name: Callable[[str], str] | None = None, source: str = "") -> None:
    """Loads ``weights`` into ``model``; a missing or unexpected weight, or a shape that differs, fails naming the
    keys (in the original's names where ``original_name`` translates them)."""
    rename = original_name or (lambda key: key)
    expected = model.state_dict()
    wrong = sorted(f"{rename(key)} {list(value.shape)} (needs {list(expected[key].shape)})"
                   for key, value in weights.items() if key in expected and value.shape != expected[key].shape)
    if wrong:
        raise ConversionError(f"{component}: weights whose shape does not fit {type(model).__name__} built from the "
                              f"config: {'; '.join(wrong[:MAX_NAMED_KEYS])}"
                              + (f"; ... ({len(wrong)} keys)" if len(wrong) > MAX_NAMED_KEYS else ""))
    try:
        missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    except RuntimeError as error:
        raise ConversionError(f"{component}: the checkpoint's weights do not load into {type(model).__name__}: "
                              + " ".join(str(error).split())) from None
    if missing:
        raise ConversionError(f"{component}: the checkpoint lacks weights {type(model).__name__} needs: "
                              f"{_name_keys(rename(key) for key in missing)}"
                              + (f" (diffusers' names; from {source}*)" if source else ""))
    if unexpected:
        raise ConversionError(f"{component}: {type(model).__name__} has no place for "
                              f"{_name_keys(rename(key) for key in unexpected)}")


def _check_consumed(group: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
                    component: str) -> dict[str, str]:
    """Every tensor of ``group`` reached ``converted``: diffusers' converters drop what they do not know silently.
    A tensor counts as used when a converted tensor shares its memory, which covers their reshapes. Returns, for
    each converted key, the original key it came from."""
    source: dict[tuple[int, int], list[str]] = {}
    for key, value in group.items():  # tied tensors share one entry
        source.setdefault((value.data_ptr(), value.numel()), []).append(key)
    origin, used = {}, set()
    for key, value in converted.items():
        keys = source.get((value.data_ptr(), value.numel()), [])
        used.update(keys)
        if keys:
            origin[key] = keys[0]
    left = set(group) - used
    if left:
        raise ConversionError(f"{component}: checkpoint keys the converter did not map: {_name_keys(left)}")
    return origin


def _model_params(config: Mapping[str, Any]) -> dict[str, Any]:
    return config["model"]["params"]


def _ema_name(key: str) -> str:
    """LitEma's name of a UNet weight: the key inside ``model`` with its dots removed."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _ema_names(unet_keys: Iterable[str]) -> dict[str, str]:
    """UNet key -> the name of its EMA shadow."""
    names = {key: _ema_name(key) for key in unet_keys}
    if len(set(names.values())) != len(names):
        raise ConversionError("unet: two UNet keys share one EMA shadow name; the EMA weights are ambiguous")
    return names


def _check_ema_extras(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """The ``model_ema.*`` keys are exactly the shadows of the UNet's weights, plus ``decay`` and ``num_updates``
    (checked after the UNet loaded, so that a missing UNet weight is reported as that)."""
    known = set(_ema_names(groups["unet"]).values()) | set(EMA_META_KEYS)
    unknown = set(groups["ema"]) - known
    if unknown:
        raise ConversionError(f"model_ema: keys that shadow no UNet weight: {_name_keys(unknown)}")


def _unet_source(groups: Mapping[str, Mapping[str, torch.Tensor]], use_ema: bool) -> dict[str, torch.Tensor]:
    """The ``model.diffusion_model.*`` weights to convert: the training weights, or their EMA shadows (under the
    training weights' names, so that diffusers' converter reads them as it reads any LDM UNet)."""
    if not use_ema:
        return dict(groups["unet"])
    if not groups["ema"]:
        raise ConversionError("--ema: the checkpoint holds no model_ema.* weights (it was saved without EMA, or "
                              "as EMA weights already); convert without --ema")
    names = _ema_names(groups["unet"])
    missing = [name for name in names.values() if name not in groups["ema"]]
    if missing:
        raise ConversionError(f"--ema: the checkpoint lacks EMA shadows of UNet weights: {_name_keys(missing)}")
    return {key: groups["ema"][name] for key, name in names.items()}


def _diffusers_helpers():
    from diffusers.loaders import single_file_utils

    return single_file_utils


def convert_unet(unet_weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]):
    """``model.diffusion_model.*`` -> ``UNet2DConditionModel``, through diffusers' own LDM config and weight
    converters. ``sample_size`` is the latent size of the config (diffusers' guess, 128, is SD's); ``in_channels``
    follows the weights (cross-attention 3, hybrid 6)."""
    from diffusers import UNet2DConditionModel

    helpers = _diffusers_helpers()
    params = _model_params(config)
    unet_params = params["unet_config"]["params"]
    unet_config = helpers.create_unet_diffusers_config_from_ldm(config, {})
    if unet_params.get("num_heads", -1) == -1:  # heads given by their width instead
        if not unet_params.get("num_head_channels"):
            raise ConversionError("config: unet_config.params sets neither num_heads nor num_head_channels")
        unet_config["attention_head_dim"] = [width // unet_params["num_head_channels"]
                                             for width in unet_config["block_out_channels"]]
    first = UNET_PREFIX + "input_blocks.0.0.weight"
    if first in unet_weights:
        in_channels = int(unet_weights[first].shape[1])
        if in_channels != unet_config["in_channels"]:
            logger.info("unet: the weights take %d input channels, the config says %d: following the weights",
                        in_channels, unet_config["in_channels"])
        unet_config["in_channels"] = in_channels
    unet_config["sample_size"] = int(unet_params.get("image_size", params.get("image_size", 64)))
    try:
        weights = helpers.convert_ldm_unet_checkpoint(dict(unet_weights), unet_config)
    except KeyError as error:
        raise ConversionError(f"unet: the checkpoint lacks {UNET_PREFIX}{error.args[0]}") from None
    weights = {key: value for key, value in weights.items() if value is not None}
    origin = _check_consumed(unet_weights, weights, "unet")
    unet = UNet2DConditionModel(**unet_config)
    _load_strict(unet, weights, "unet", lambda key: origin.get(key, key), UNET_PREFIX)
    return unet


def convert_vae(vae_weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]):
    """``first_stage_model.*`` (Cheff's AutoencoderKL) -> diffusers ``AutoencoderKL``, through diffusers' LDM
    converters; ``sample_size`` is the config's image resolution, ``scaling_factor`` its ``scale_factor``."""
    from diffusers import AutoencoderKL

    helpers = _diffusers_helpers()
    params = _model_params(config)
    first_stage = params["first_stage_config"]["params"]
    ddconfig = first_stage["ddconfig"]
    if first_stage.get("embed_dim", ddconfig["z_channels"]) != ddconfig["z_channels"]:
        raise ConversionError(f"config: first_stage_config embed_dim {first_stage['embed_dim']} differs from "
                              f"z_channels {ddconfig['z_channels']}; diffusers' AutoencoderKL needs them equal")
    if ddconfig.get("attn_resolutions"):
        raise ConversionError(f"config: first_stage_config attn_resolutions {ddconfig['attn_resolutions']}: "
                              "diffusers' AutoencoderKL has attention only in its mid block")
    if not ddconfig.get("double_z", True):
        raise ConversionError("config: first_stage_config double_z false is not a KL autoencoder")
    vae_config = helpers.create_vae_diffusers_config_from_ldm(config, {}, scaling_factor=params.get("scale_factor"))
    vae_config["sample_size"] = int(ddconfig["resolution"])
    try:
        weights = helpers.convert_ldm_vae_checkpoint(dict(vae_weights), vae_config)
    except KeyError as error:
        raise ConversionError(f"vae: the checkpoint lacks {VAE_PREFIX}{error.args[0]}") from None
    weights = {key: value for key, value in weights.items() if value is not None}
    origin = _check_consumed(vae_weights, weights, "vae")
    vae = AutoencoderKL(**vae_config)
    _load_strict(vae, weights, "vae", lambda key: origin.get(key, key), VAE_PREFIX)
    return vae


def check_vae_copy(vae_weights: Mapping[str, torch.Tensor], copy_weights: Mapping[str, torch.Tensor]) -> int:
    """``cond_stage_model.autoencoder.*`` must be a bit-identical copy of ``first_stage_model.*`` (the cond stage
    encodes the previous image with it); then the pipeline's one ``vae`` serves both. Returns the keys compared."""
    if not copy_weights:
        logger.info("no %s* copy in the checkpoint: the vae serves the cond stage too", VAE_COPY_PREFIX)
        return 0
    expected = {VAE_COPY_PREFIX + key[len(VAE_PREFIX):] for key in vae_weights}
    if set(copy_weights) != expected:
        raise ConversionError(
            f"{VAE_COPY_PREFIX}* differs from {VAE_PREFIX}* in its keys: missing "
            f"{_name_keys(expected - set(copy_weights))}; extra {_name_keys(set(copy_weights) - expected)}")
    differ = [key for key, value in copy_weights.items()
              if not _identical(value, vae_weights[VAE_PREFIX + key[len(VAE_COPY_PREFIX):]])]
    if differ:
        raise ConversionError(f"{VAE_COPY_PREFIX}* is not bit-identical to {VAE_PREFIX}*, so the cond stage encoded "
                              f"the previous image with another VAE than the pipeline's: {_name_keys(differ)}")
    return len(copy_weights)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


_CLIP_VISUAL = {"class_embedding": "embeddings.class_embedding",
                "positional_embedding": "embeddings.position_embedding.weight",
                "conv1.weight": "embeddings.patch_embedding.weight",
                "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
                "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
_CLIP_VISUAL_BLOCK = {"attn.out_proj.weight": "self_attn.out_proj.weight",
                      "attn.out_proj.bias": "self_attn.out_proj.bias",
                      "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
                      "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
                      "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                      "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}


def _clip_visual_name(key: str, prefix: str = "") -> str:
    """The OpenAI ``visual`` key a ``CLIPVisionModel`` key (without ``vision_model.``) comes from, for errors."""
    inverse = {target: original for original, target in _CLIP_VISUAL.items()}
    if key in inverse:
        return prefix + inverse[key]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if match:
        block = {target: original for original, target in _CLIP_VISUAL_BLOCK.items()}
        part = re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", match[2])
        name = f"attn.in_proj_{part[1]}" if part else block.get(match[2])
        if name:
            return f"{prefix}transformer.resblocks.{match[1]}.{name}"
    return key


def clip_visual_to_transformers(weights: Mapping[str, torch.Tensor], prefix: str = "",
                                target_prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """OpenAI CLIP ``visual`` keys (``conv1``, ``transformer.resblocks.N.attn.in_proj_weight``, ...) under
    ``prefix`` -> transformers ``CLIPVisionModel`` keys under ``target_prefix`` (q/k/v split out of ``in_proj``).

    Returns the converted weights and, for each converted key, the original key; a key with no counterpart fails."""
    simple, block = _CLIP_VISUAL, _CLIP_VISUAL_BLOCK
    resblock = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped = []
    for key, value in weights.items():
        name = key[len(prefix):]
        match = resblock.fullmatch(name)
        targets: list[tuple[str, torch.Tensor]] = []
        if name in simple:
            targets = [(simple[name], value)]
        elif match and match[2] in block:
            targets = [(f"encoder.layers.{match[1]}.{block[match[2]]}", value)]
        elif match and match[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if match[2].endswith("weight") else "bias"
            if value.shape[0] % 3:
                raise ConversionError(f"image_encoder: {key} has {value.shape[0]} rows, not 3 x width")
            targets = [(f"encoder.layers.{match[1]}.self_attn.{part}_proj.{kind}", chunk.clone())
                       for part, chunk in zip("qkv", value.chunk(3, dim=0))]
        if not targets:
            unmapped.append(key)
        for target, tensor in targets:
            converted[target_prefix + target] = tensor
            origin[target_prefix + target] = key
    if unmapped:
        raise ConversionError(f"image_encoder: keys with no CLIPVisionModel counterpart: {_name_keys(unmapped)}")
    return converted, origin


def convert_image_encoder(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]):
    """``cond_stage_model.clip_img_encoder.*`` -> transformers ``CLIPVisionModel`` (ViT-B/32 at 256 px in the
    paper, QuickGELU). EHRXDiff feeds the UNet the ViT's tokens before ``ln_post``: ``last_hidden_state``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vit = _model_params(config)["cond_stage_config"]["params"]["clip_visual_enc_config"]
    vision_config = CLIPVisionConfig(
        hidden_size=vit["width"], intermediate_size=4 * vit["width"], num_hidden_layers=vit["layers"],
        num_attention_heads=vit["heads"], image_size=vit["input_resolution"], patch_size=vit["patch_size"],
        num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=vit["width"])
    model = CLIPVisionModel(vision_config)
    # transformers 4.x names the weights vision_model.*, 5.x without the prefix
    target_prefix = "vision_model." if any(key.startswith("vision_model.") for key in model.state_dict()) else ""
    converted, origin = clip_visual_to_transformers(weights, IMAGE_ENCODER_PREFIX, target_prefix)
    _load_strict(model, converted, "image_encoder",
                 lambda key: origin.get(key) or _clip_visual_name(key[len(target_prefix):], IMAGE_ENCODER_PREFIX))
    return model.eval()


def convert_event_encoder(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                          num_heads: int = ORIGINAL_EVENT_HEADS):
    """``cond_stage_model.clip_tab_encoder.*`` -> ``EventEncoderModel``, 1:1: the same ``nn.TransformerEncoder``
    (post-norm, ReLU) and ``fc``, without a start token or time encoding, which the original lacks.

    The widths are read from the weights; ``num_heads`` cannot be (the original hard-codes 24)."""
    from ..models.event_encoder import EventEncoderModel

    local = {key[len(EVENT_ENCODER_PREFIX):]: value for key, value in weights.items()}
    needed = ("transformer.layers.0.self_attn.in_proj_weight", "transformer.layers.0.linear1.weight", "fc.weight")
    missing = [EVENT_ENCODER_PREFIX + key for key in needed if key not in local]
    if missing:
        raise ConversionError(f"event_encoder: the checkpoint lacks {_name_keys(missing)}")
    hidden = int(local[needed[0]].shape[1])
    if hidden % num_heads:
        raise ConversionError(f"event_encoder: width {hidden} is not divisible by {num_heads} heads")
    layers = {int(match[1]) for key in local if (match := re.match(r"transformer\.layers\.(\d+)\.", key))}
    cond = _model_params(config)["cond_stage_config"]["params"]
    model = EventEncoderModel(
        event_dim=hidden, hidden_dim=hidden, num_layers=max(layers) + 1, num_heads=num_heads,
        ff_dim=int(local[needed[1]].shape[0]), dropout=0.0, norm_first=False,
        context_dim=int(local["fc.weight"].shape[0]), max_events=int(cond.get("max_event_len", 1024)),
        time_encoding=False, start_token=False)
    _load_strict(model, local, "event_encoder", lambda key: EVENT_ENCODER_PREFIX + key)
    return model.eval()


def convert_fusion_adapter(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], latent_channels: int):
    """``cond_stage_model.vae_projector`` / ``adaptor`` -> ``FusionAdapterModel("token_linear")``: the events
    (``max_event_len``), the ViT tokens and one token per latent channel, mixed by one Linear over the token axis
    into ``condition_feat_dim`` tokens."""
    from ..models.fusion_adapter import FusionAdapterModel

    params = _model_params(config)
    cond = params["cond_stage_config"]["params"]
    vit = cond["clip_visual_enc_config"]
    context_dim = int(cond["context_dim"])
    if context_dim != vit["width"]:
        raise ConversionError(f"config: cond_stage context_dim {context_dim} differs from the ViT width "
                              f"{vit['width']}: the original then adds a projector after the adaptor, which "
                              "FusionAdapterModel does not have")
    latent_size = int(params["unet_config"]["params"].get("image_size", params.get("image_size", 64)))
    model = FusionAdapterModel(
        adapter_type="token_linear", context_dim=context_dim, image_dim=int(vit["width"]),
        num_image_tokens=(vit["input_resolution"] // vit["patch_size"]) ** 2 + 1, vae_channels=latent_channels,
        vae_token_dim=latent_size**2, num_event_tokens=int(cond.get("max_event_len", 1024)),
        num_output_tokens=int(cond.get("condition_feat_dim", 512)))
    local = {key[len("cond_stage_model."):]: value for key, value in weights.items()}
    _load_strict(model, local, "fusion_adapter", lambda key: "cond_stage_model." + key)
    return model.eval()


def make_scheduler(config: Mapping[str, Any]):
    """The original's DDPM schedule as a ``DDIMScheduler``: its "linear" schedule is linear in sqrt(beta), diffusers'
    ``scaled_linear``; eps prediction, no clipping (``clip_denoised`` false), Stable Diffusion's DDIM settings."""
    from diffusers import DDIMScheduler

    params = _model_params(config)
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear" or params.get("given_betas") is not None:
        raise ConversionError(f"config: beta_schedule {schedule!r} (or given_betas): only the original's 'linear' "
                              "schedule (diffusers' scaled_linear) is supported")
    parameterization = params.get("parameterization", "eps")
    prediction = {"eps": "epsilon", "x0": "sample"}.get(parameterization)
    if prediction is None:
        raise ConversionError(f"config: parameterization {parameterization!r} is neither 'eps' nor 'x0'")
    if params.get("v_posterior", 0.0):
        raise ConversionError("config: v_posterior != 0 changes the posterior variance, which DDIM does not use")
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=float(params.get("linear_start", 1e-4)),
                         beta_end=float(params.get("linear_end", 2e-2)),
                         num_train_timesteps=int(params.get("timesteps", 1000)), prediction_type=prediction,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 12 buffers ``DDPM.register_schedule`` derives from ``betas`` (in float64, as the original does with
    numpy), for comparison with a checkpoint's."""
    betas = betas.double()
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }


def check_schedule(buffers: Mapping[str, torch.Tensor], scheduler: Any, rtol: float = SCHEDULE_RTOL) -> int:
    """The checkpoint's schedule buffers agree with ``scheduler``'s betas to ``rtol``: the scheduler samples the
    noise levels the UNet was trained on. Returns how many buffers were compared."""
    if not buffers:
        logger.warning("the checkpoint holds none of the schedule buffers (betas, alphas_cumprod, ...): the "
                       "scheduler comes from the config alone")
        return 0
    absent = [name for name in SCHEDULE_BUFFERS if name not in buffers]
    if absent:
        logger.warning("the checkpoint lacks schedule buffers %s; comparing the others", ", ".join(absent))
    expected = schedule_buffers(scheduler.betas)
    wrong = []
    for name, value in buffers.items():
        reference = expected[name]
        if value.shape != reference.shape or not torch.allclose(value.double(), reference, rtol=rtol, atol=1e-12):
            wrong.append(name)
    if wrong:
        raise ConversionError(
            f"schedule: the checkpoint's {_name_keys(wrong)} disagree (rtol {rtol}) with DDIMScheduler("
            f"scaled_linear, beta_start={scheduler.config.beta_start}, beta_end={scheduler.config.beta_end}, "
            f"num_train_timesteps={scheduler.config.num_train_timesteps}) built from the config: check "
            "linear_start, linear_end and timesteps")
    return len(buffers)


# ---------------------------------------------------------------------------------------------------------------
# the whole conversion


def convert_ehrxdiff_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                                use_ema: bool = False, event_num_heads: int = ORIGINAL_EVENT_HEADS
                                ) -> ConvertedEHRXDiff:
    """The original EHRXDiff state dict + config -> the pipeline's components, every key accounted for.

    Args:
        state_dict: the original ``LatentDiffusion`` state dict (see the module docstring for its groups).
        config: the original config (the yml's root, or the mixin's params dict); interpolations are resolved.
        use_ema: take the UNet's LitEma shadows (``model_ema.*``) instead of its training weights.
        event_num_heads: the event encoder's attention heads, which the weights do not record (the original: 24).
    """
    config = normalize_config(config)
    groups = _partition(state_dict)
    conditioning = detect_conditioning(state_dict)
    wanted = _model_params(config).get("conditioning_key")
    expected = {"crossattn": "cross_attention", "hybrid": "hybrid"}.get(wanted)
    if wanted is not None and expected != conditioning:
        logger.warning("config conditioning_key %r but the UNet weights are %s: following the weights", wanted,
                       conditioning)
    checks = []
    unet = convert_unet(_unet_source(groups, use_ema), config)
    _check_ema_extras(groups)
    vae = convert_vae(groups["vae"], config)
    compared = check_vae_copy(groups["vae"], groups["vae_copy"])
    if compared:
        checks.append(f"{VAE_COPY_PREFIX}* is bit-identical to {VAE_PREFIX}* ({compared} keys)")
    latent_channels = int(vae.config.latent_channels)
    if unet.config.out_channels != latent_channels:
        raise ConversionError(f"unet predicts {unet.config.out_channels} channels but the vae has {latent_channels} "
                              "latent channels")
    image_encoder = convert_image_encoder(groups["image_encoder"], config)
    event_encoder = convert_event_encoder(groups["event_encoder"], config, event_num_heads)
    fusion_adapter = convert_fusion_adapter(groups["fusion_adapter"], config, latent_channels)
    widths = {"event_encoder": event_encoder.config.context_dim, "fusion_adapter": fusion_adapter.config.context_dim,
              "unet": unet.config.cross_attention_dim}
    if len(set(widths.values())) != 1:
        raise ConversionError(f"the components disagree on the context width: {widths}")
    scheduler = make_scheduler(config)
    compared = check_schedule(groups["schedule"], scheduler)
    if compared:
        checks.append(f"{compared} schedule buffers match the DDIMScheduler (rtol {SCHEDULE_RTOL})")
    counts = {name: len(group) for name, group in groups.items() if group}
    components = {"vae": vae.eval(), "unet": unet.eval(), "scheduler": scheduler, "event_encoder": event_encoder,
                  "fusion_adapter": fusion_adapter, "image_encoder": image_encoder}
    return ConvertedEHRXDiff(components=components, conditioning=conditioning, use_ema=use_ema, key_counts=counts,
                             checks=checks)


def save_ehrxdiff_pipeline(converted: ConvertedEHRXDiff, out: str | Path, overwrite: bool = False,
                           inputs: Iterable[str | Path] = ()) -> Path:
    """Builds the ``EHRXDiffPipeline`` from ``converted`` and saves it into ``out`` all at once (a temporary sibling
    folder, renamed at the end), so that a failure leaves no half-written pipeline."""
    from .pipeline_ehrxdiff import EHRXDiffPipeline

    pipeline = EHRXDiffPipeline(**converted.components, event_embedder=None, conditioning=converted.conditioning)
    with atomic_directory(out, overwrite, inputs=inputs) as staging:
        pipeline.save_pretrained(staging)
    return Path(out)


def convert_ehrxdiff_checkpoint(checkpoint: str | Path, config: str | Path, out: str | Path, use_ema: bool = False,
                                overwrite: bool = False) -> ConvertedEHRXDiff:
    """Reads the original checkpoint and config, converts them, and saves the pipeline folder ``out``; the output
    folder is checked before any work."""
    inputs = [checkpoint, config]
    check_output_dir(out, overwrite, inputs=inputs)
    original_config = load_original_config(config)
    state_dict = load_original_state_dict(checkpoint)
    try:
        converted = convert_ehrxdiff_state_dict(state_dict, original_config, use_ema=use_ema)
    except (KeyError, TypeError) as error:  # a config entry missing, or of the wrong kind
        raise ConversionError(f"--config {config}: a missing or malformed entry ({type(error).__name__}: {error}); "
                              "compare it with the original configs/EHRXDiff.yml") from None
    del state_dict
    save_ehrxdiff_pipeline(converted, out, overwrite=overwrite, inputs=inputs)
    logger.info("EHRXDiff pipeline written to %s", out)
    return converted
