"""The EHRXDiff converter (arXiv 2409.07012, github dek924/EHRXDiff) on a tiny state dict in the original's layout.

The original keys are generated here, each beside the diffusers / transformers key it must become, by walking the
original modules' construction (openaimodel.UNetModel, Cheff's AutoencoderKL, OpenAI's VisualTransformer,
TabTransformerEmbedder), independently of the converter; the weights are random, so a tensor that lands in the
wrong place is caught. Components with a forward that is easy to write out (ViT, event encoder, fusion adapter)
are also compared with a plain-torch reference computed from the original weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ehr_diffusers.commands.convert import run_convert_ehrxdiff
from ehr_diffusers.io import MARKER_NAME, OutputExistsError
from ehr_diffusers.pipelines.convert_ehrxdiff import (
    SCHEDULE_BUFFERS,
    ConversionError,
    convert_ehrxdiff_checkpoint,
    convert_ehrxdiff_state_dict,
    detect_conditioning,
    load_original_config,
    load_original_state_dict,
    resolve_interpolations,
    save_ehrxdiff_pipeline,
)

# The original yml's structure (configs/EHRXDiff.yml) with tiny widths, its interpolations kept.
TINY_YML = """\
context_dim: 32
max_event_len: 8
model:
  base_learning_rate: 5.0e-05
  target: cheff.ldm.models.diffusion.ddpm_tab.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0295
    num_timesteps_cond: 1
    timesteps: 1000
    image_size: 16
    channels: 3
    cond_stage_trainable: true
    conditioning_key: crossattn
    scale_factor: 0.18215
    use_ema: true
    unet_config:
      target: cheff.ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 16
        in_channels: 3 # 3 + 3 (for concat input)
        out_channels: 3
        model_channels: 32
        attention_resolutions:
        - 2
        num_res_blocks: 1
        channel_mult:
        - 1
        - 2
        num_heads: 4
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: ${context_dim}
        use_checkpoint: true
        legacy: False
    first_stage_config:
      target: cheff.ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 3
        ckpt_path: trained_models/cheff_autoencoder.pt
        ddconfig:
          double_z: True
          z_channels: 3
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult:
          - 1
          - 2
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: cheff.ldm.modules.encoders.modules.MultiModalTransformerAdaptor
      params:
        autoencoder_config: ${model.params.first_stage_config.params}
        clip_visual_enc_config:
          input_resolution: 32
          layers: 2
          width: 32
          patch_size: 8
          heads: 4
        clip_enc_checkpoint: "trained_models/clip.ckpt"
        context_dim: ${context_dim}
        max_event_len: ${max_event_len}
        condition_feat_dim: 12
        clip_trainable: true
"""
UNET = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_ds": (2,), "context_dim": 32}
VAE = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 3}
VIT = {"width": 32, "layers": 2, "heads": 4, "patch": 8, "resolution": 32}
EVENTS = {"width": 48, "ff": 96, "layers": 2, "context": 32, "heads": 24, "max_events": 8}
LATENT_SIZE, OUTPUT_TOKENS = 16, 12


# ----------------------------------------------------------------------------------------------------------------
# the original layout, generated with the target names beside it


class _Keys(list):
    """(original key, target key, shape) triples."""

    def add(self, original: str, target: str, shape: tuple[int, ...]) -> None:
        self.append((original, target, shape))

    def norm(self, original: str, target: str, width: int) -> None:
        self.add(f"{original}.weight", f"{target}.weight", (width,))
        self.add(f"{original}.bias", f"{target}.bias", (width,))

    def linear(self, original: str, target: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(f"{original}.weight", f"{target}.weight", (out, inp))
        if bias:
            self.add(f"{original}.bias", f"{target}.bias", (out,))

    def conv(self, original: str, target: str, out: int, inp: int, kernel: int) -> None:
        self.add(f"{original}.weight", f"{target}.weight", (out, inp, kernel, kernel))
        self.add(f"{original}.bias", f"{target}.bias", (out,))


def unet_keys(model_channels: int, channel_mult, num_res_blocks: int, attention_ds, context_dim: int,
              in_channels: int = 3, out_channels: int = 3) -> _Keys:
    """openaimodel.UNetModel's keys (spatial transformers, depth 1, conv proj_in) beside UNet2DConditionModel's."""
    keys, time_dim = _Keys(), 4 * model_channels

    def resblock(original, target, inp, out):
        keys.norm(f"{original}.in_layers.0", f"{target}.norm1", inp)
        keys.conv(f"{original}.in_layers.2", f"{target}.conv1", out, inp, 3)
        keys.linear(f"{original}.emb_layers.1", f"{target}.time_emb_proj", out, time_dim)
        keys.norm(f"{original}.out_layers.0", f"{target}.norm2", out)
        keys.conv(f"{original}.out_layers.3", f"{target}.conv2", out, out, 3)
        if inp != out:
            keys.conv(f"{original}.skip_connection", f"{target}.conv_shortcut", out, inp, 1)

    def transformer(original, target, width):
        keys.norm(f"{original}.norm", f"{target}.norm", width)
        keys.conv(f"{original}.proj_in", f"{target}.proj_in", width, width, 1)
        block_o, block_t = f"{original}.transformer_blocks.0", f"{target}.transformer_blocks.0"
        for attention, source_width in (("attn1", width), ("attn2", context_dim)):
            keys.linear(f"{block_o}.{attention}.to_q", f"{block_t}.{attention}.to_q", width, width, bias=False)
            keys.linear(f"{block_o}.{attention}.to_k", f"{block_t}.{attention}.to_k", width, source_width, bias=False)
            keys.linear(f"{block_o}.{attention}.to_v", f"{block_t}.{attention}.to_v", width, source_width, bias=False)
            keys.linear(f"{block_o}.{attention}.to_out.0", f"{block_t}.{attention}.to_out.0", width, width)
        keys.linear(f"{block_o}.ff.net.0.proj", f"{block_t}.ff.net.0.proj", 8 * width, width)  # GEGLU
        keys.linear(f"{block_o}.ff.net.2", f"{block_t}.ff.net.2", width, 4 * width)
        for norm in ("norm1", "norm2", "norm3"):
            keys.norm(f"{block_o}.{norm}", f"{block_t}.{norm}", width)
        keys.conv(f"{original}.proj_out", f"{target}.proj_out", width, width, 1)

    keys.linear("time_embed.0", "time_embedding.linear_1", time_dim, model_channels)
    keys.linear("time_embed.2", "time_embedding.linear_2", time_dim, time_dim)
    keys.conv("input_blocks.0.0", "conv_in", model_channels, in_channels, 3)
    skips, width, ds, index = [model_channels], model_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for block in range(num_res_blocks):
            resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{block}", width, mult * model_channels)
            width = mult * model_channels
            if ds in attention_ds:
                transformer(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{block}", width)
            skips.append(width)
            index += 1
        if level != len(channel_mult) - 1:
            keys.conv(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv", width, width, 3)
            skips.append(width)
            index, ds = index + 1, ds * 2
    resblock("middle_block.0", "mid_block.resnets.0", width, width)
    transformer("middle_block.1", "mid_block.attentions.0", width)
    resblock("middle_block.2", "mid_block.resnets.1", width, width)
    index = 0
    for up, (level, mult) in enumerate(reversed(list(enumerate(channel_mult)))):
        for block in range(num_res_blocks + 1):
            inp = width + skips.pop()
            resblock(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{block}", inp, mult * model_channels)
            width, sub = mult * model_channels, 1
            if ds in attention_ds:
                transformer(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{block}", width)
                sub = 2
            if level and block == num_res_blocks:
                keys.conv(f"output_blocks.{index}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv", width, width, 3)
                ds //= 2
            index += 1
    keys.norm("out.0", "conv_norm_out", model_channels)
    keys.conv("out.2", "conv_out", out_channels, model_channels, 3)
    return _Keys(("model.diffusion_model." + original, target, shape) for original, target, shape in keys)


def vae_keys(ch: int, ch_mult, num_res_blocks: int, z_channels: int, prefix: str = "first_stage_model.") -> _Keys:
    """Cheff's AutoencoderKL keys (no attention outside the mid blocks) beside diffusers' AutoencoderKL's."""
    keys = _Keys()

    def resblock(original, target, inp, out):
        keys.norm(f"{original}.norm1", f"{target}.norm1", inp)
        keys.conv(f"{original}.conv1", f"{target}.conv1", out, inp, 3)
        keys.norm(f"{original}.norm2", f"{target}.norm2", out)
        keys.conv(f"{original}.conv2", f"{target}.conv2", out, out, 3)
        if inp != out:
            keys.conv(f"{original}.nin_shortcut", f"{target}.conv_shortcut", out, inp, 1)

    def mid(part, width):
        resblock(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", width, width)
        keys.norm(f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm", width)
        for original, target in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            keys.conv(f"{part}.mid.attn_1.{original}", f"{part}.mid_block.attentions.0.{target}", width, width, 1)
        resblock(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", width, width)

    keys.conv("encoder.conv_in", "encoder.conv_in", ch, 3, 3)
    width = ch
    for level, mult in enumerate(ch_mult):
        for block in range(num_res_blocks):
            resblock(f"encoder.down.{level}.block.{block}", f"encoder.down_blocks.{level}.resnets.{block}", width,
                     ch * mult)
            width = ch * mult
        if level != len(ch_mult) - 1:
            keys.conv(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                      width, width, 3)
    mid("encoder", width)
    keys.norm("encoder.norm_out", "encoder.conv_norm_out", width)
    keys.conv("encoder.conv_out", "encoder.conv_out", 2 * z_channels, width, 3)
    keys.conv("decoder.conv_in", "decoder.conv_in", width, z_channels, 3)
    mid("decoder", width)
    for level in reversed(range(len(ch_mult))):
        up = len(ch_mult) - 1 - level
        for block in range(num_res_blocks + 1):
            resblock(f"decoder.up.{level}.block.{block}", f"decoder.up_blocks.{up}.resnets.{block}", width,
                     ch * ch_mult[level])
            width = ch * ch_mult[level]
        if level:
            keys.conv(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", width, width, 3)
    keys.norm("decoder.norm_out", "decoder.conv_norm_out", ch)
    keys.conv("decoder.conv_out", "decoder.conv_out", 3, ch, 3)
    keys.conv("quant_conv", "quant_conv", 2 * z_channels, 2 * z_channels, 1)
    keys.conv("post_quant_conv", "post_quant_conv", z_channels, z_channels, 1)
    return _Keys((prefix + original, target, shape) for original, target, shape in keys)


def vit_keys(width: int, layers: int, patch: int, resolution: int) -> list[tuple[str, tuple[int, ...]]]:
    """The EHRXDiff VisualTransformer's keys (OpenAI CLIP's visual layout, no proj)."""
    prefix = "cond_stage_model.clip_img_encoder."
    keys = [("class_embedding", (width,)), ("positional_embedding", ((resolution // patch) ** 2 + 1, width)),
            ("conv1.weight", (width, 3, patch, patch)), ("ln_pre.weight", (width,)), ("ln_pre.bias", (width,))]
    for layer in range(layers):
        block = f"transformer.resblocks.{layer}."
        keys += [(block + "attn.in_proj_weight", (3 * width, width)), (block + "attn.in_proj_bias", (3 * width,)),
                 (block + "attn.out_proj.weight", (width, width)), (block + "attn.out_proj.bias", (width,)),
                 (block + "ln_1.weight", (width,)), (block + "ln_1.bias", (width,)),
                 (block + "mlp.c_fc.weight", (4 * width, width)), (block + "mlp.c_fc.bias", (4 * width,)),
                 (block + "mlp.c_proj.weight", (width, 4 * width)), (block + "mlp.c_proj.bias", (width,)),
                 (block + "ln_2.weight", (width,)), (block + "ln_2.bias", (width,))]
    keys += [("ln_post.weight", (width,)), ("ln_post.bias", (width,))]
    return [(prefix + key, shape) for key, shape in keys]


def event_keys(width: int, ff: int, layers: int, context: int) -> list[tuple[str, tuple[int, ...]]]:
    """TabTransformerEmbedder's keys: nn.TransformerEncoder + fc."""
    prefix, keys = "cond_stage_model.clip_tab_encoder.", []
    for layer in range(layers):
        block = f"transformer.layers.{layer}."
        keys += [(block + "self_attn.in_proj_weight", (3 * width, width)),
                 (block + "self_attn.in_proj_bias", (3 * width,)),
                 (block + "self_attn.out_proj.weight", (width, width)), (block + "self_attn.out_proj.bias", (width,)),
                 (block + "linear1.weight", (ff, width)), (block + "linear1.bias", (ff,)),
                 (block + "linear2.weight", (width, ff)), (block + "linear2.bias", (width,)),
                 (block + "norm1.weight", (width,)), (block + "norm1.bias", (width,)),
                 (block + "norm2.weight", (width,)), (block + "norm2.bias", (width,))]
    keys += [("fc.weight", (context, width)), ("fc.bias", (context,))]
    return [(prefix + key, shape) for key, shape in keys]


def original_schedule(linear_start: float, linear_end: float, timesteps: int) -> dict[str, torch.Tensor]:
    """DDPM.register_schedule of the original (numpy float64, stored as float32)."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}


def tiny_original(in_channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny EHRXDiff state dict in the original's key order and layout, random weights (scaled to stay finite
    through the forwards)."""
    generator = torch.Generator().manual_seed(seed)

    def random(shape):
        return torch.randn(shape, generator=generator) * 0.2

    state: dict[str, torch.Tensor] = {}
    for name, value in original_schedule(0.0015, 0.0295, 1000).items():
        state[name] = value
    unet = unet_keys(**{key: UNET[key] for key in ("model_channels", "channel_mult", "num_res_blocks",
                                                   "context_dim")}, attention_ds=UNET["attention_ds"],
                     in_channels=in_channels)
    for key, _, shape in unet:
        state[key] = random(shape)
    for key, _, shape in vae_keys(**VAE):
        state[key] = random(shape)
    for key, shape in vit_keys(VIT["width"], VIT["layers"], VIT["patch"], VIT["resolution"]):
        state[key] = random(shape)
    for key, _, _ in vae_keys(**VAE):
        copy_key = "cond_stage_model.autoencoder." + key[len("first_stage_model."):]
        state[copy_key] = state[key].clone()
    for key, shape in event_keys(EVENTS["width"], EVENTS["ff"], EVENTS["layers"], EVENTS["context"]):
        state[key] = random(shape)
    image_tokens = (VIT["resolution"] // VIT["patch"]) ** 2 + 1
    state["cond_stage_model.vae_projector.weight"] = random((UNET["context_dim"], LATENT_SIZE**2))
    state["cond_stage_model.vae_projector.bias"] = random((UNET["context_dim"],))
    state["cond_stage_model.adaptor.weight"] = random((OUTPUT_TOKENS, EVENTS["max_events"] + image_tokens + 3))
    state["cond_stage_model.adaptor.bias"] = random((OUTPUT_TOKENS,))
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    for key, _, shape in unet:
        state["model_ema." + key[len("model."):].replace(".", "")] = random(shape)
    return state


def tiny_config() -> dict:
    import yaml

    return resolve_interpolations(yaml.safe_load(TINY_YML))


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return tiny_original()


@pytest.fixture(scope="module")
def converted(original):
    return convert_ehrxdiff_state_dict(original, tiny_config())


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Stands in for ehr_diffusers.pipelines.pipeline_ehrxdiff (the save step only needs its constructor and
    save_pretrained): saves each component into its subfolder, as DiffusionPipeline does."""

    class FakeEHRXDiffPipeline:
        fail = False

        def __init__(self, *, vae, unet, scheduler, event_encoder, fusion_adapter, image_encoder, event_embedder,
                     conditioning):
            self.components = {"vae": vae, "unet": unet, "scheduler": scheduler, "event_encoder": event_encoder,
                               "fusion_adapter": fusion_adapter, "image_encoder": image_encoder}
            assert event_embedder is None
            self.conditioning = conditioning

        def save_pretrained(self, directory):
            for name, component in self.components.items():
                component.save_pretrained(Path(directory) / name)
            if self.fail:
                raise OSError("disk full")
            (Path(directory) / "model_index.json").write_text(json.dumps({"conditioning": self.conditioning}))

    module = types.ModuleType("ehr_diffusers.pipelines.pipeline_ehrxdiff")
    module.EHRXDiffPipeline = FakeEHRXDiffPipeline
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return FakeEHRXDiffPipeline


def _write_inputs(tmp_path: Path, state: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    checkpoint, config = tmp_path / "last.ckpt", tmp_path / "EHRXDiff.yml"
    torch.save({"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.6.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": []}, checkpoint)
    config.write_text(TINY_YML)
    return checkpoint, config


# ----------------------------------------------------------------------------------------------------------------
# mapping


def test_unet_and_vae_weights_land_where_the_original_layout_says(original, converted):
    unet = converted.components["unet"].state_dict()
    expected = unet_keys(**{key: UNET[key] for key in ("model_channels", "channel_mult", "num_res_blocks",
                                                       "context_dim")}, attention_ds=UNET["attention_ds"])
    assert set(unet) == {target for _, target, _ in expected}
    for key, target, _ in expected:
        assert torch.equal(unet[target], original[key]), (key, target)
    vae = converted.components["vae"].state_dict()
    expected = vae_keys(**VAE)
    assert set(vae) == {target for _, target, _ in expected}
    for key, target, _ in expected:  # the mid-attention 1x1 convs become Linear weights
        assert torch.equal(vae[target].reshape(original[key].shape), original[key]), (key, target)
    config = converted.components["unet"].config
    assert (config.sample_size, config.in_channels, config.cross_attention_dim) == (LATENT_SIZE, 3, 32)
    assert list(config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    vae_config = converted.components["vae"].config
    assert (vae_config.sample_size, vae_config.scaling_factor, vae_config.latent_channels) == (32, 0.18215, 3)


def test_unet_forward_runs_at_the_latent_size(converted):
    unet = converted.components["unet"]
    with torch.no_grad():
        out = unet(torch.randn(1, 3, LATENT_SIZE, LATENT_SIZE), 10, encoder_hidden_states=torch.randn(1, 12, 32))
    assert out.sample.shape == (1, 3, LATENT_SIZE, LATENT_SIZE) and torch.isfinite(out.sample).all()


def _openai_vit(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """EHRXDiff's VisualTransformer.forward written out (tokens before ln_post)."""
    def w(name):
        return state["cond_stage_model.clip_img_encoder." + name]

    width = VIT["width"]
    x = F.conv2d(images, w("conv1.weight"), stride=VIT["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([w("class_embedding").expand(x.shape[0], 1, width), x], dim=1) + w("positional_embedding")
    x = F.layer_norm(x, (width,), w("ln_pre.weight"), w("ln_pre.bias"))
    for layer in range(VIT["layers"]):
        block = f"transformer.resblocks.{layer}."
        attention = nn.MultiheadAttention(width, VIT["heads"], batch_first=True)
        attention.load_state_dict({name: w(block + "attn." + name) for name in
                                   ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        h = F.layer_norm(x, (width,), w(block + "ln_1.weight"), w(block + "ln_1.bias"))
        x = x + attention(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), w(block + "ln_2.weight"), w(block + "ln_2.bias"))
        h = F.linear(h, w(block + "mlp.c_fc.weight"), w(block + "mlp.c_fc.bias"))
        x = x + F.linear(h * torch.sigmoid(1.702 * h), w(block + "mlp.c_proj.weight"), w(block + "mlp.c_proj.bias"))
    return x


def test_image_encoder_equals_the_original_vit(original, converted):
    images = torch.randn(2, 3, VIT["resolution"], VIT["resolution"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = converted.components["image_encoder"](pixel_values=images).last_hidden_state
        reference = _openai_vit(original, images)
    assert ours.shape == (2, 17, VIT["width"])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    post = converted.components["image_encoder"].state_dict()
    assert torch.equal(post["post_layernorm.weight"], original["cond_stage_model.clip_img_encoder.ln_post.weight"])


def test_event_encoder_equals_a_plain_transformer_encoder(original, converted):
    prefix = "cond_stage_model.clip_tab_encoder."
    reference = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(EVENTS["width"], EVENTS["heads"], EVENTS["ff"], batch_first=True), EVENTS["layers"],
        enable_nested_tensor=False)
    reference.load_state_dict({key[len(prefix + "transformer."):]: value for key, value in original.items()
                               if key.startswith(prefix + "transformer.")})
    reference.eval()
    events = torch.randn(2, 5, EVENTS["width"], generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    encoder = converted.components["event_encoder"]
    assert (encoder.config.num_heads, encoder.config.start_token, encoder.config.time_encoding) == (24, False, False)
    with torch.no_grad():
        tokens = encoder(events, mask).tokens
        expected = F.linear(reference(events, src_key_padding_mask=~mask), original[prefix + "fc.weight"],
                            original[prefix + "fc.bias"])
    torch.testing.assert_close(tokens[mask], expected[mask], rtol=1e-4, atol=1e-5)


def test_fusion_adapter_equals_the_original_token_mix(original, converted):
    generator = torch.Generator().manual_seed(3)
    events = torch.randn(2, EVENTS["max_events"], 32, generator=generator)
    image_tokens = torch.randn(2, 17, 32, generator=generator)
    latents = torch.randn(2, 3, LATENT_SIZE, LATENT_SIZE, generator=generator)
    with torch.no_grad():
        ours = converted.components["fusion_adapter"](events, None, image_tokens, latents)
        vae_tokens = F.linear(latents.flatten(2), original["cond_stage_model.vae_projector.weight"],
                              original["cond_stage_model.vae_projector.bias"])
        tokens = torch.cat([events, image_tokens, vae_tokens], dim=1).transpose(1, 2)
        expected = F.linear(tokens, original["cond_stage_model.adaptor.weight"],
                            original["cond_stage_model.adaptor.bias"]).transpose(1, 2)
    assert ours.shape == (2, OUTPUT_TOKENS, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_scheduler_and_bookkeeping(converted):
    scheduler = converted.components["scheduler"]
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == (
        "scaled_linear", 0.0015, 0.0295)
    assert (scheduler.config.prediction_type, scheduler.config.clip_sample, scheduler.config.set_alpha_to_one,
            scheduler.config.steps_offset) == ("epsilon", False, False, 1)
    assert converted.conditioning == "cross_attention" and not converted.use_ema
    assert converted.key_counts["schedule"] == 12 and converted.key_counts["vae_copy"] == converted.key_counts["vae"]
    assert any("bit-identical" in check for check in converted.checks)
    assert any("schedule buffers" in check for check in converted.checks)


def test_config_json_params_form_converts_the_same(original, tmp_path):
    """The PyTorchModelHubMixin form: config.json holds model.params (resolved) and the weights a safetensors."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()["model"]["params"]))
    save_file(original, str(tmp_path / "model.safetensors"))
    config = load_original_config(tmp_path / "config.json")
    state = load_original_state_dict(tmp_path)  # the folder: its model.safetensors
    assert set(state) == set(original)
    result = convert_ehrxdiff_state_dict(state, config)
    assert torch.equal(result.components["unet"].conv_out.weight, original["model.diffusion_model.out.2.weight"])


# ----------------------------------------------------------------------------------------------------------------
# conditioning, EMA


def test_detect_conditioning_reads_the_first_conv():
    hybrid = tiny_original(in_channels=6)
    assert detect_conditioning(hybrid) == "hybrid"
    assert detect_conditioning(tiny_original()) == "cross_attention"
    odd = dict(hybrid, **{"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 5, 3, 3)})
    with pytest.raises(ConversionError, match="takes 5 channels"):
        detect_conditioning(odd)
    with pytest.raises(ConversionError, match="input_blocks.0.0.weight"):
        detect_conditioning({})


def test_hybrid_weights_give_a_six_channel_unet(caplog):
    result = convert_ehrxdiff_state_dict(tiny_original(in_channels=6), tiny_config())  # the config says 3
    assert result.conditioning == "hybrid" and result.components["unet"].config.in_channels == 6
    assert "following the weights" in caplog.text


def test_ema_takes_the_shadows(original):
    result = convert_ehrxdiff_state_dict(original, tiny_config(), use_ema=True)
    unet = result.components["unet"].state_dict()
    for key, target, _ in unet_keys(**{key: UNET[key] for key in ("model_channels", "channel_mult", "num_res_blocks",
                                                                  "context_dim")}, attention_ds=UNET["attention_ds"]):
        shadow = "model_ema." + key[len("model."):].replace(".", "")
        assert torch.equal(unet[target], original[shadow]) and not torch.equal(unet[target], original[key]), key
    assert result.use_ema


def test_ema_without_shadows_or_with_one_missing_fails(original):
    without = {key: value for key, value in original.items() if not key.startswith("model_ema.")}
    with pytest.raises(ConversionError, match="no model_ema"):
        convert_ehrxdiff_state_dict(without, tiny_config(), use_ema=True)
    convert_ehrxdiff_state_dict(without, tiny_config())  # fine without --ema
    partial = dict(original)
    del partial["model_ema.diffusion_modelout2bias"]
    with pytest.raises(ConversionError, match=r"model_ema\.diffusion_modelout2bias \(1 key\)"):
        convert_ehrxdiff_state_dict(partial, tiny_config(), use_ema=True)


# ----------------------------------------------------------------------------------------------------------------
# every key accounted for


@pytest.mark.parametrize("key, named", [
    ("cond_stage_model.clip_tab_encoder.fc.bias", "cond_stage_model.clip_tab_encoder.fc.bias"),
    ("cond_stage_model.clip_img_encoder.transformer.resblocks.1.attn.in_proj_weight",
     "cond_stage_model.clip_img_encoder.transformer.resblocks.1.attn.in_proj_weight"),
    ("cond_stage_model.adaptor.weight", "cond_stage_model.adaptor.weight"),
    ("model.diffusion_model.out.2.bias", "conv_out.bias"),
    ("first_stage_model.decoder.conv_out.weight", "decoder.conv_out.weight"),
])
def test_a_missing_key_fails_and_is_named(original, key, named):
    state = dict(original)
    del state[key]
    if key.startswith("first_stage_model."):  # keep the duplicated copy consistent, so that the VAE itself fails
        del state["cond_stage_model.autoencoder." + key[len("first_stage_model."):]]
    with pytest.raises(ConversionError, match="lacks") as error:
        convert_ehrxdiff_state_dict(state, tiny_config())
    assert named in str(error.value)


def test_extra_keys_fail_named_with_their_count(original):
    extra = dict(original, **{f"cond_stage_model.projector.{index}.weight": torch.zeros(1) for index in range(12)})
    with pytest.raises(ConversionError, match="no EHRXDiff component maps") as error:
        convert_ehrxdiff_state_dict(extra, tiny_config())
    assert "cond_stage_model.projector.0.weight" in str(error.value) and "(12 keys)" in str(error.value)
    assert str(error.value).count("cond_stage_model.projector.") == 10


@pytest.mark.parametrize("key", ["model.diffusion_model.input_blocks.1.2.weight",
                                 "first_stage_model.encoder.mid.attn_2.q.weight",
                                 "cond_stage_model.clip_img_encoder.proj",
                                 "cond_stage_model.clip_tab_encoder.transformer.norm.weight",
                                 "model_ema.diffusion_modelextraweight"])
def test_an_extra_key_inside_a_known_group_fails_named(original, key):
    state = dict(original, **{key: torch.randn(4)})
    if key.startswith("first_stage_model."):
        state["cond_stage_model.autoencoder." + key[len("first_stage_model."):]] = state[key]
    with pytest.raises(ConversionError) as error:
        convert_ehrxdiff_state_dict(state, tiny_config())
    assert key in str(error.value)


def test_a_wrong_shape_fails_naming_the_component(original):
    state = dict(original, **{"cond_stage_model.vae_projector.weight": torch.zeros(32, 100)})
    with pytest.raises(ConversionError, match="fusion_adapter.*vae_projector.weight"):
        convert_ehrxdiff_state_dict(state, tiny_config())


def test_the_duplicated_autoencoder_must_be_bit_identical(original):
    key = "cond_stage_model.autoencoder.decoder.mid.attn_1.q.weight"
    state = dict(original, **{key: original[key] + 1e-7})
    with pytest.raises(ConversionError, match="not bit-identical") as error:
        convert_ehrxdiff_state_dict(state, tiny_config())
    assert key in str(error.value)
    state = dict(original)
    del state[key]
    with pytest.raises(ConversionError, match="differs from first_stage_model.* in its keys"):
        convert_ehrxdiff_state_dict(state, tiny_config())


def test_schedule_buffers_must_match_the_scheduler(original):
    state = dict(original, betas=original["betas"] * (1 + 1e-3))
    with pytest.raises(ConversionError, match=r"betas \(1 key\) disagree"):
        convert_ehrxdiff_state_dict(state, tiny_config())
    config = tiny_config()
    config["model"]["params"]["linear_end"] = 0.012  # LDM's usual schedule: the buffers are not it
    with pytest.raises(ConversionError, match=r"disagree \(rtol 1e-05\)") as error:
        convert_ehrxdiff_state_dict(original, config)
    assert "(12 keys)" in str(error.value)
    assert set(SCHEDULE_BUFFERS) <= set(original)


# ----------------------------------------------------------------------------------------------------------------
# inputs


def test_interpolations_resolve_like_omegaconf():
    config = resolve_interpolations({"a": 3, "b": {"c": "${a}", "d": "x${a}y", "e": "${f}"}, "f": [1, {"g": 2}],
                                     "h": "${f.1.g}"})
    assert config == {"a": 3, "b": {"c": 3, "d": "x3y", "e": [1, {"g": 2}]}, "f": [1, {"g": 2}], "h": 2}
    with pytest.raises(ConversionError, match=r"\$\{nowhere\}"):
        resolve_interpolations({"a": "${nowhere}"})
    with pytest.raises(ConversionError, match="cycle"):
        resolve_interpolations({"a": "${b}", "b": "${a}"})
    with pytest.raises(ConversionError, match="not supported"):
        resolve_interpolations({"a": "${oc.env:HOME}"})
    cond = tiny_config()["model"]["params"]["cond_stage_config"]["params"]
    assert cond["context_dim"] == 32 and cond["autoencoder_config"]["ddconfig"]["ch"] == 32


def test_checkpoint_forms_load_the_same(original, tmp_path):
    checkpoint, _ = _write_inputs(tmp_path, original)
    assert load_original_state_dict(checkpoint).keys() == original.keys()
    torch.save(original, tmp_path / "bare.pt")
    bare = load_original_state_dict(tmp_path / "bare.pt")
    assert all(torch.equal(bare[key], value) for key, value in original.items())
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        load_original_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(ConversionError, match="model.safetensors"):
        load_original_state_dict(tmp_path)
    torch.save({"state_dict": [1, 2]}, tmp_path / "odd.ckpt")
    with pytest.raises(ConversionError, match="neither a state dict"):
        load_original_state_dict(tmp_path / "odd.ckpt")


class _Opaque:
    """A pickled object that weights_only refuses."""


def test_a_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    torch.save({"state_dict": {"betas": torch.zeros(2)}, "callbacks": _Opaque()}, tmp_path / "code.ckpt")
    with pytest.raises(ConversionError, match="weights_only=True"):
        load_original_state_dict(tmp_path / "code.ckpt")


def test_config_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConversionError, match="bad.json"):
        load_original_config(tmp_path / "bad.json")
    (tmp_path / "other.yml").write_text("model:\n  params:\n    image_size: 64\n")
    with pytest.raises(ConversionError, match="other.yml.*unet_config"):
        load_original_config(tmp_path / "other.yml")
    with pytest.raises(FileNotFoundError, match="--config"):
        load_original_config(tmp_path / "absent.yml")


# ----------------------------------------------------------------------------------------------------------------
# saving


def test_each_component_saves_and_loads_back(converted, tmp_path):
    for name, component in converted.components.items():
        component.save_pretrained(tmp_path / name)
        loaded = type(component).from_pretrained(tmp_path / name)
        if hasattr(component, "state_dict"):
            before, after = component.state_dict(), loaded.state_dict()
            assert before.keys() == after.keys(), name
            assert all(torch.equal(before[key], after[key]) for key in before), name
        else:
            public = {key: value for key, value in component.config.items() if not key.startswith("_")}
            assert {key: loaded.config[key] for key in public} == public, name


def test_command_writes_the_pipeline_atomically(original, tmp_path, fake_pipeline, capsys):
    checkpoint, config = _write_inputs(tmp_path, original)
    out = tmp_path / "pipeline"
    args = argparse.Namespace(checkpoint=checkpoint, config=config, out=out, ema=True, overwrite=False)
    run_convert_ehrxdiff(args)
    printed = capsys.readouterr().out
    assert "conditioning: cross_attention" in printed and "UNet: EMA weights" in printed
    assert "bit-identical" in printed and "unet: UNet2DConditionModel" in printed
    assert (out / MARKER_NAME).is_file() and json.loads((out / "model_index.json").read_text()) == {
        "conditioning": "cross_attention"}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert torch.equal(unet.conv_out.bias, original["model_ema.diffusion_modelout2bias"])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_convert_ehrxdiff(args)
    fake_pipeline.fail = True  # a failure while saving leaves the earlier output as it was, and no temporary folder
    with pytest.raises(OSError, match="disk full"):
        run_convert_ehrxdiff(argparse.Namespace(**{**vars(args), "overwrite": True}))
    assert (out / "model_index.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["EHRXDiff.yml", "last.ckpt", "pipeline"]


def test_a_bad_checkpoint_writes_nothing(original, tmp_path, fake_pipeline):
    state = dict(original, **{"cond_stage_model.autoencoder.quant_conv.bias": torch.zeros(6)})
    checkpoint, config = _write_inputs(tmp_path, state)
    with pytest.raises(ConversionError, match="bit-identical"):
        convert_ehrxdiff_checkpoint(checkpoint, config, tmp_path / "pipeline")
    assert not (tmp_path / "pipeline").exists()
    with pytest.raises(OutputExistsError, match="replace the input"):
        convert_ehrxdiff_checkpoint(checkpoint, config, tmp_path)


def test_the_real_pipeline_saves_loads_and_samples(converted, tmp_path):
    module = pytest.importorskip("ehr_diffusers.pipelines.pipeline_ehrxdiff")
    save_ehrxdiff_pipeline(converted, tmp_path / "pipeline")
    pipeline = module.EHRXDiffPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipeline.config.conditioning == "cross_attention"
    assert torch.equal(pipeline.unet.conv_out.weight, converted.components["unet"].conv_out.weight)
    assert torch.equal(pipeline.event_encoder.fc.weight, converted.components["event_encoder"].fc.weight)
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(prev_image=torch.rand(3, 32, 32), event_embeddings=np.random.rand(3, EVENTS["width"]),
                       num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                       return_dict=False)[0]
    assert latents.shape == (1, 3, LATENT_SIZE, LATENT_SIZE) and torch.isfinite(latents).all()
    hybrid = convert_ehrxdiff_state_dict(tiny_original(in_channels=6), tiny_config())
    save_ehrxdiff_pipeline(hybrid, tmp_path / "hybrid")
    assert module.EHRXDiffPipeline.from_pretrained(tmp_path / "hybrid").config.conditioning == "hybrid"
