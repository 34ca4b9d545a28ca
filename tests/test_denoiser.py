"""EHRDenoiserModel: shapes, conditioning that conditions, real attention over latent tokens, save/load, errors."""

from __future__ import annotations

import pytest
import torch

from ehr_diffusers.models import EHRDenoiserModel

CONFIG = {"latent_dim": 32, "num_tokens": 4, "hidden_dim": 32, "num_layers": 2, "num_heads": 4, "condition_dim": 12,
          "fourier_dim": 16}


def trained_like(**overrides) -> EHRDenoiserModel:
    """A tiny model whose zero-initialised (adaLN-Zero) layers are given random weights, as training would."""
    torch.manual_seed(0)
    model = EHRDenoiserModel(**{**CONFIG, **overrides}).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name or "output_projection" in name:
                parameter.normal_(0, 0.1)
    return model


def inputs(batch=3):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 32, generator=generator), torch.linspace(-5, 5, batch),
            torch.randn(batch, 12, generator=generator))


def test_a_fresh_model_predicts_v_zero_and_shapes_hold():
    sample, logsnr, condition = inputs()
    alpha, sigma = torch.sigmoid(logsnr).sqrt()[:, None], torch.sigmoid(-logsnr).sqrt()[:, None]
    # adaLN-Zero and a zero output layer: the network's v starts at 0, so eps_hat = sigma z and x_hat = alpha z
    velocity = EHRDenoiserModel(**CONFIG, prediction_type="v_prediction")(sample, logsnr, condition).sample
    assert velocity.shape == sample.shape and torch.count_nonzero(velocity) == 0
    model = EHRDenoiserModel(**CONFIG)
    out = model(sample, logsnr, condition).sample
    torch.testing.assert_close(out, sigma * sample)
    x_model = EHRDenoiserModel(**CONFIG, prediction_type="sample")
    torch.testing.assert_close(x_model(sample, logsnr, condition).sample, alpha * sample)
    tokens = torch.randn(3, 5, 12)
    assert model(sample, torch.tensor(0.0), tokens, encoder_attention_mask=torch.ones(3, 5)).sample.shape == (3, 32)
    assert model.null_condition_embeds(3).shape == (3, 12)
    assert model.null_condition_embeds(3, num_tokens=5).shape == (3, 5, 12)


def test_noise_level_and_condition_change_the_output_in_every_item():
    model = trained_like()
    sample, logsnr, condition = inputs()
    with torch.no_grad():
        base = model(sample, logsnr, condition).sample
        other_noise = model(sample, logsnr + 3.0, condition).sample
        other_condition = model(sample, logsnr, torch.randn(3, 12)).sample
        null = model(sample, logsnr, model.null_condition_embeds(3)).sample
    for changed in (other_noise, other_condition, null):
        assert ((changed - base).abs().amax(dim=1) > 1e-4).all()


def test_attention_relates_latent_tokens_and_reads_the_context():
    model = trained_like()
    sample, logsnr, condition = inputs()
    edited = sample.clone()
    edited[:, :8] += 1.0  # token 0 only
    tokens = torch.randn(3, 5, 12)
    with torch.no_grad():
        base = model(sample, logsnr, condition).sample
        moved = model(edited, logsnr, condition).sample
        assert (moved[:, 8:] - base[:, 8:]).abs().max() > 1e-4  # other tokens saw token 0 through self-attention
        masked = torch.ones(3, 5)
        masked[:, 3:] = 0
        with_mask = model(sample, logsnr, tokens, encoder_attention_mask=masked).sample
        changed_tail = tokens.clone()
        changed_tail[:, 3:] = torch.randn(3, 2, 12)
        torch.testing.assert_close(model(sample, logsnr, changed_tail, encoder_attention_mask=masked).sample, with_mask)
        assert (model(sample, logsnr, changed_tail).sample - model(sample, logsnr, tokens).sample).abs().max() > 1e-4


def test_items_are_independent_and_save_load_round_trips(tmp_path):
    model = trained_like(structured_dim=3)
    sample, logsnr, condition = inputs()
    structured = torch.randn(3, 3)
    with torch.no_grad():
        batch = model(sample, logsnr, condition, structured_conditions=structured).sample
        alone = model(sample[1:2], logsnr[1:2], condition[1:2], structured_conditions=structured[1:2]).sample
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = EHRDenoiserModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, logsnr, condition, structured_conditions=structured).sample, batch)


def test_bad_shapes_are_named_and_the_reference_size():
    model = EHRDenoiserModel(**CONFIG)
    with pytest.raises(ValueError, match="sample must be"):
        model(torch.randn(2, 31), torch.zeros(2), torch.randn(2, 12))
    with pytest.raises(ValueError, match="condition_dim 12"):
        model(torch.randn(2, 32), torch.zeros(2), torch.randn(2, 384))
    with pytest.raises(ValueError, match="multiple of num_tokens"):
        EHRDenoiserModel(latent_dim=30, num_tokens=4)
    with torch.device("meta"):
        reference = EHRDenoiserModel(**EHRDenoiserModel.seed_reference_config())
    assert reference.config.hidden_dim == 4096 and len(reference.blocks) == 8
    assert 2.7e9 < sum(p.numel() for p in reference.parameters()) < 2.9e9


def test_predictions_are_exact_conversions_of_one_velocity():
    """eps, x and v outputs of the same weights satisfy z = alpha x + sigma eps and v = alpha eps - sigma x, and at the
    noise end (logSNR -20) x_hat = (z - sigma eps_hat) / alpha stays as bounded as the network's v."""
    weights = trained_like().state_dict()
    sample, _, condition = inputs()
    logsnr = torch.tensor([-20.0, -2.0, 20.0])
    outputs = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        model = EHRDenoiserModel(**CONFIG, prediction_type=kind)
        model.load_state_dict(weights)
        with torch.no_grad():
            outputs[kind] = model(sample, logsnr, condition).sample.double()
    alpha, sigma = torch.sigmoid(logsnr).sqrt()[:, None].double(), torch.sigmoid(-logsnr).sqrt()[:, None].double()
    eps, v, x = outputs["epsilon"], outputs["v_prediction"], outputs["sample"]
    torch.testing.assert_close(alpha * x + sigma * eps, sample.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha * eps - sigma * x, v, atol=1e-5, rtol=1e-5)
    # what the scheduler does with the float32 epsilon at logSNR -20 stays within float32 rounding / alpha of x
    x_from_eps = (sample[0] - sigma[0].float() * eps[0].float()) / alpha[0].float()
    assert (x_from_eps.double() - x[0]).abs().max() < 0.02 and x[0].abs().max() < 1.01 * v[0].abs().max() + 1e-3
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        EHRDenoiserModel(**CONFIG, prediction_type="noise")


@pytest.mark.parametrize("condition_dim", [12, 32])  # 32: key width equal to the model width (packed projections)
def test_a_pooled_condition_equals_a_sequence_of_one_repeated_token(condition_dim):
    """The one-key shortcut of cross-attention gives what full attention over identical tokens gives."""
    model = trained_like(condition_dim=condition_dim)
    sample, logsnr, _ = inputs()
    condition = torch.randn(sample.shape[0], condition_dim)
    with torch.no_grad():
        pooled = model(sample, logsnr, condition).sample
        repeated = model(sample, logsnr, condition[:, None, :].expand(-1, 3, -1)).sample
    torch.testing.assert_close(pooled, repeated, atol=1e-5, rtol=1e-5)


def test_self_attention_equals_multihead_attention():
    """The scaled_dot_product_attention path computes what nn.MultiheadAttention computes with the same weights."""
    block = trained_like().blocks[0]
    hidden = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = block.attention(hidden, hidden, hidden, need_weights=False)[0]
        torch.testing.assert_close(block._self_attention(hidden), expected, atol=1e-5, rtol=1e-5)


def test_every_model_saves_safetensors_only_and_keeps_variants(tmp_path) -> None:
    from ehr_diffusers.models.ehrdiff_baseline import EHRDiffMLP

    for model in (EHRDenoiserModel(latent_dim=8, num_tokens=2, hidden_dim=16, num_layers=1, num_heads=2,
                                   condition_dim=4, fourier_dim=8), EHRDiffMLP(data_dim=6, hidden_dims=(8, 8))):
        name = type(model).__name__
        with pytest.raises(ValueError, match=f"safe_serialization=False: {name} saves weights as safetensors only"):
            model.save_pretrained(tmp_path / name, safe_serialization=False)
        assert not (tmp_path / name).exists() or not list((tmp_path / name).glob("*.bin"))
        model.save_pretrained(tmp_path / name, variant="fp16")
        assert (tmp_path / name / "diffusion_pytorch_model.fp16.safetensors").is_file()
        loaded = type(model).from_pretrained(tmp_path / name, variant="fp16")
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
