"""EHRAutoencoderModel: shapes, losses per group, calibration, decoding, save/load, schema checks."""

from __future__ import annotations

import pytest
import torch

from ehr_diffusers.data.ehr.schema import EHRSchema
from ehr_diffusers.models import EHRAutoencoderModel


@pytest.fixture(scope="module")
def demo(demo_dataset):
    from datasets import load_from_disk

    schema = EHRSchema.load(demo_dataset)
    train = load_from_disk(str(demo_dataset))["train"]
    return schema, torch.from_numpy(schema.encode(train[:]))


def tiny(schema: EHRSchema) -> EHRAutoencoderModel:
    torch.manual_seed(0)
    return EHRAutoencoderModel.from_schema(schema, latent_dim=16, hidden_dim=64, num_layers=1, dropout=0.0)


def test_shapes_and_losses_per_group(demo):
    schema, vectors = demo
    model = tiny(schema)
    out = model(vectors[:8])
    assert out.latent.shape == (8, 16) and out.logits.shape == (8, schema.dim)
    total, per_group = model.loss(out.logits, vectors[:8])
    assert set(per_group) == {group.name for group in schema.groups}
    torch.testing.assert_close(total, sum(per_group.values()))
    perfect = torch.where(vectors[:8] > 0.5, 30.0, -30.0)  # confident, right logits for the 0/1 columns
    _, right = model.loss(perfect, vectors[:8])
    assert right["icd10_categories"] < 1e-6 and right["sex"] < 1e-6 and right["race"] < 1e-6


def test_training_reduces_the_reconstruction_loss(demo):
    schema, vectors = demo
    model = tiny(schema)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = vectors[:256]
    first = float(model.loss(model(batch).logits, batch)[0].detach())
    for _ in range(60):
        loss = model.loss(model(batch).logits, batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.5 * first


def test_calibrated_thresholds_reproduce_training_prevalence(demo):
    schema, vectors = demo
    model = tiny(schema)
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(vectors.shape, generator=generator)  # any scores: calibration must still match counts
    model.calibrate_thresholds(probabilities, vectors)
    codes = schema.slices["icd10_categories"]
    decoded = (probabilities[:, codes] >= model.thresholds[codes]).float()
    torch.testing.assert_close(decoded.sum(dim=0), vectors[:, codes].sum(dim=0))  # ties have probability zero
    never = vectors[:, codes].sum(dim=0) == 0
    assert (model.thresholds[codes][never] > 1).all()


def test_decoding_gives_valid_records_and_sampling_is_seeded(demo):
    schema, vectors = demo
    model = tiny(schema).eval()
    logits = model(vectors[:32]).logits
    decoded = model.to_vectors(logits)
    for name in ("marital_status", "race"):
        assert (decoded[:, schema.slices[name]].sum(dim=1) == 1).all()
    records = schema.decode(decoded)
    assert len(records) == 32 and {record["sex"] for record in records} <= {"F", "M"}
    first = model.to_vectors(logits, sample=True, generator=torch.Generator().manual_seed(3))
    again = model.to_vectors(logits, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)


def test_save_load_round_trip_keeps_statistics_and_thresholds(demo, tmp_path):
    schema, vectors = demo
    model = tiny(schema).eval()
    with torch.no_grad():
        model.fit_latent_statistics(model.encode(vectors))
        model.calibrate_thresholds(model.probabilities(model(vectors).logits), vectors)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = EHRAutoencoderModel.from_pretrained(tmp_path).eval()
    for name in ("latent_mean", "latent_std", "thresholds"):
        torch.testing.assert_close(getattr(loaded, name), getattr(model, name))
    with torch.no_grad():
        torch.testing.assert_close(loaded(vectors[:4]).logits, model(vectors[:4]).logits)
        latent = model.normalize_latent(model.encode(vectors))
    assert latent.mean(dim=0).abs().max() < 1e-4 and (latent.std(dim=0) - 1).abs().max() < 1e-3
    torch.testing.assert_close(model.denormalize_latent(latent), model.encode(vectors), atol=1e-5, rtol=1e-5)


def test_a_schema_that_does_not_match_is_named(demo):
    schema, _ = demo
    model = tiny(schema)
    model.check_schema(schema)
    other = EHRSchema([group for group in schema.groups if group.name != "race"])
    with pytest.raises(ValueError, match="at group 5"):
        model.check_schema(other)
    with pytest.raises(ValueError, match="kind 'dense'"):
        EHRAutoencoderModel(groups=[{"name": "x", "kind": "dense", "width": 2}])


def test_bernoulli_decoding_changes_with_the_seed_and_per_row_generators_are_independent(demo):
    schema, vectors = demo
    model = tiny(schema).eval()
    logits = model(vectors[:64]).logits
    first = model.to_vectors(logits, sample=True, generator=torch.Generator().manual_seed(3))
    other = model.to_vectors(logits, sample=True, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(first, other)
    rows = [torch.Generator().manual_seed(index) for index in range(4)]
    alone = model.to_vectors(logits[2:3], sample=True, generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(model.to_vectors(logits[:4], sample=True, generator=rows)[2:3], alone)


def test_mean_sampled_codes_match_the_probability_sum(demo):
    """On a constructed latent the decoder gives fixed probabilities; Bernoulli draws must hit their sum on average,
    and one-hot draws must follow the softmax shares."""
    schema, _ = demo
    model = tiny(schema).eval()
    latent = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)).expand(20000, -1)
    with torch.no_grad():
        logits = model.decode(latent)
    probabilities = model.probabilities(logits)
    decoded = model.to_vectors(logits, sample=True, generator=torch.Generator().manual_seed(1))
    codes = schema.slices["icd10_categories"]
    expected = float(probabilities[0, codes].sum())
    mean = float(decoded[:, codes].sum(dim=1).mean())
    spread = float((probabilities[0, codes] * (1 - probabilities[0, codes])).sum().sqrt()) / 20000 ** 0.5
    assert abs(mean - expected) < 5 * spread + 1e-6
    race = schema.slices["race"]
    torch.testing.assert_close(decoded[:, race].mean(dim=0), probabilities[0, race], atol=0.02, rtol=0.0)


@pytest.mark.parametrize("regularization", ["noise", "kl"])
def test_latent_regularization_is_saved_and_acts_only_in_training(demo, tmp_path, regularization):
    schema, vectors = demo
    torch.manual_seed(0)
    model = EHRAutoencoderModel.from_schema(schema, latent_dim=16, hidden_dim=64, num_layers=1, dropout=0.0,
                                            latent_regularization=regularization, latent_noise=0.3, kl_weight=0.05)
    model.save_pretrained(tmp_path)
    loaded = EHRAutoencoderModel.from_pretrained(tmp_path)
    assert (loaded.config.latent_regularization, loaded.config.latent_noise, loaded.config.kl_weight) == (
        regularization, 0.3, 0.05)
    model.train()
    noisy = [model(vectors[:16]).logits for _ in range(2)]
    assert not torch.allclose(noisy[0], noisy[1])  # the decoder reads a regularised latent in training
    out = model(vectors[:16])
    assert (out.kl is not None) == (regularization == "kl")
    if out.kl is not None:
        assert out.kl >= 0 and torch.isclose(model.regularization_loss(out.kl), 0.05 * out.kl)
    model.eval()
    torch.testing.assert_close(model(vectors[:16]).logits, model.decode(model.encode(vectors[:16])))
    assert model.encode(vectors[:16]).shape == (16, 16)
    with pytest.raises(ValueError, match="latent_regularization"):
        EHRAutoencoderModel.from_schema(schema, latent_regularization="dropout")


def test_residual_spread_is_calibrated_and_restores_the_spread_of_continuous_fields(demo, tmp_path):
    """A decoder that predicts the mean age for everyone: sampled decoding adds the calibrated residual spread back,
    so decoded ages spread like the data (law of total variance); thresholded decoding keeps the prediction."""
    schema, vectors = demo
    model = tiny(schema).eval()
    age = schema.slices["age"].start
    logits = torch.zeros_like(vectors)
    logits[:, age] = vectors[:, age].mean()
    model.calibrate_residuals(model.probabilities(logits), vectors)
    torch.testing.assert_close(model.residual_std[age], vectors[:, age].std(), rtol=1e-4, atol=1e-6)
    assert model.residual_std[schema.slices["icd10_categories"]].abs().max() == 0
    sampled = model.to_vectors(logits, sample=True, generator=torch.Generator().manual_seed(0))[:, age]
    assert abs(float(sampled.std()) - float(vectors[:, age].std())) < 0.15 * float(vectors[:, age].std())
    assert float(model.to_vectors(logits)[:, age].std()) < 1e-6
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(EHRAutoencoderModel.from_pretrained(tmp_path).residual_std, model.residual_std)
