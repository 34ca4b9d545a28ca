"""Batched text generation with any causal language model, from a Hub id, a local folder or a loaded model.

The LLM summariser and the LLM judge both go through ``CausalLMGenerator``, so a 14B model on a GPU and a tiny random
model in the tests run the same code. Choices, and why:

- Weights are loaded with ``use_safetensors=True``: a pickled checkpoint can run code when loaded, safetensors cannot.
  ``trust_remote_code`` is off by default for the same reason.
- A prompt is a (system, user) pair. With a chat template (``tokenizer.chat_template``) it is rendered by the template
  with a generation prompt; some templates (Mistral's older ones, Gemma's) reject a system turn, and then the system
  text is put at the top of the user turn. Without a template the prompt is plain text, "system\\n\\nuser\\n".
- Prompts are padded on the LEFT: a decoder-only model continues the last position of each row, so padding must not
  sit between a prompt and its continuation. Padding is done here rather than by the tokenizer so a wrapped tokenizer
  is used as is, whatever its ``padding_side``; a tokenizer without a pad token pads with its end-of-sequence token
  (the attention mask hides it either way).
- Only the new tokens are decoded, without special tokens, so an answer never repeats its prompt.
- Every batch is seeded from ``seed`` and the text of its prompts (``batch_seed``): a sampled answer depends only on
  the seed and the rows of its batch, not on what ran before it or on where a labelling chunk starts, so a run that
  resumes half-way gives the rows it had not done the same answers a run from the start would have, and no two
  batches of different patients share a random stream.
- Generation settings that are not given (end-of-sequence ids, repetition penalty) come from the model's own
  ``generation_config``, as its authors set them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ModelError
from ..hub.errors import explain_missing_model

logger = logging.getLogger(__name__)

Prompt = tuple[str, str]


def batch_seed(seed: int, prompts: Sequence[Prompt]) -> int:
    """The seed of one batch: ``seed`` mixed with a hash of the batch's prompts (see the module docstring)."""
    digest = hashlib.sha256(repr((seed, list(prompts))).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class CausalLMGenerator:
    """A causal LM and its tokenizer, answering (system, user) prompts in batches.

    Args:
        name_or_path: a Hub id (read from the Hugging Face cache when offline) or a folder written by
            ``save_pretrained``.
        dtype: weight dtype: ``"auto"`` (the checkpoint's own, e.g. bfloat16 for most 7B+ models), a ``torch.dtype``
            or its name ("float32", "bfloat16").
        device: where the model runs; the GPU when there is one.
        trust_remote_code: allow model code shipped with the checkpoint (off: it runs arbitrary code).
        revision: a branch, tag or commit of a Hub repository.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name_or_path = str(name_or_path)
        options = {"trust_remote_code": trust_remote_code, "revision": revision}
        with explain_missing_model(name_or_path, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **options)
        with explain_missing_model(name_or_path, "language model"):
            # `dtype` is the transformers 5 name (`torch_dtype` is deprecated); `device_map` puts the weights straight
            # on the device instead of through a full copy in CPU memory.
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, device_map=str(device or default_device()), use_safetensors=True, **options
            )
        self._setup(model, tokenizer, name_or_path)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, name: str) -> CausalLMGenerator:
        """Wraps a model and tokenizer already in memory (e.g. one generator shared by the summariser and judge);
        ``name`` is what is recorded as the model's name."""
        generator = cls.__new__(cls)
        generator._setup(model, tokenizer, name)
        return generator

    def _setup(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model = model.eval()  # no dropout: the same prompt gives the same answer
        self.tokenizer = tokenizer
        self.name = name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ModelError(f"tokenizer of {name} has neither a pad nor an end-of-sequence token to pad batches with")
        self.pad_token_id = int(pad)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def prompt_text(self, system: str, user: str) -> str:
        """The exact text the model is given for one prompt, generation prompt included."""
        if not self.tokenizer.chat_template:
            return f"{system}\n\n{user}\n"
        from jinja2.exceptions import TemplateError

        try:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # the template has no system role
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of a batch of prompts, padded on the left."""
        texts = [self.prompt_text(system, user) for system, user in prompts]
        # A chat template writes its own special tokens (BOS included); a plain prompt gets the tokenizer's.
        encoded = self.tokenizer(texts, add_special_tokens=not self.tokenizer.chat_template)["input_ids"]
        width = max(len(ids) for ids in encoded)
        input_ids = [[self.pad_token_id] * (width - len(ids)) + list(ids) for ids in encoded]
        attention_mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long, device=self.device),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long, device=self.device),
        }

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        batch_size: int = 8,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        show_progress: bool = False,
        desc: str = "generate",
    ) -> list[str]:
        """One answer per (system, user) prompt, in order."""
        from transformers import set_seed

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
        settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample and temperature is not None:
            settings["temperature"] = temperature
        answers: list[str] = []
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not show_progress)
        for start in range(0, len(prompts), batch_size):
            batch = self.encode(prompts[start : start + batch_size])
            set_seed(batch_seed(seed, prompts[start : start + batch_size]))
            output = self.model.generate(**batch, pad_token_id=self.pad_token_id, **settings)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(len(new_tokens))
        bar.close()
        return answers
