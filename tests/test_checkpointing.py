"""The multi-model checkpoint hooks through a real ``Accelerator`` on the CPU, in process: every model in its
diffusers-format subfolder, the EMA beside it, the optimizer, and a resume that continues bit for bit."""

from __future__ import annotations

import copy
import logging
import shutil
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.training_utils import EMAModel
from torch import nn

from conftest import reset_accelerate_state
from ehr_diffusers.training.checkpointing import register_checkpoint_hooks


class TinyDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 4, hidden_dim: int = 8, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyAdapter(ModelMixin, ConfigMixin):
    """Another class, with a buffer; two instances of different widths share it."""

    @register_to_config
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.register_buffer("scale", torch.rand(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


class Run:
    """One training set-up: three models (the denoiser with EMA), prepared in another order than they are
    registered, the encoder wrapped by ``torch.compile``."""

    def __init__(self, seed: int):
        self.accelerator = Accelerator(cpu=True)
        set_seed(seed)
        self.models = {"denoiser": TinyDenoiser(), "adapter": TinyAdapter(4), "encoder": TinyAdapter(3)}
        denoiser = self.models["denoiser"]
        self.ema = EMAModel(denoiser.parameters(), decay=0.9, model_cls=TinyDenoiser, model_config=denoiser.config)
        register_checkpoint_hooks(self.accelerator, self.models, {"denoiser": self.ema})
        parameters = [parameter for model in self.models.values() for parameter in model.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        compiled = torch.compile(self.models["encoder"], backend="eager")
        self.encoder, self.adapter, self.denoiser, self.optimizer, self.scheduler = self.accelerator.prepare(
            compiled, self.models["adapter"], denoiser, optimizer, scheduler
        )

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(8, 4)  # the global RNG, which accelerate saves and restores, as dropout's
            loss = self.denoiser(self.adapter(x)).pow(2).mean() + self.encoder(x[:, :3]).pow(2).mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.ema.step(self.models["denoiser"].parameters())

    def state(self) -> dict[str, Any]:
        """Everything a resume must bring back, copied."""
        return copy.deepcopy({**{name: model.state_dict() for name, model in self.models.items()},
                              "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict()})


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_identical(left, right, f"{where}[{index}]")
    else:
        assert actual == expected, where


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _new_run(seed: int) -> Run:
    reset_accelerate_state()
    return Run(seed)


def test_every_model_is_saved_in_its_subfolder_and_a_resume_continues_bit_for_bit(tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint-3"
    first = Run(seed=0)
    first.train(3)
    first.accelerator.save_state(str(checkpoint))
    saved = first.state()
    first.train(2)  # before from_pretrained below, which draws from the global RNG
    names = {path.name for path in checkpoint.iterdir()}
    assert {"denoiser", "denoiser_ema", "adapter", "encoder", "optimizer.bin", "scheduler.bin"} <= names
    assert not [name for name in names if name.startswith("model")]  # accelerate wrote no anonymous copy
    for name, cls in (("denoiser", TinyDenoiser), ("adapter", TinyAdapter), ("encoder", TinyAdapter)):
        assert_identical(cls.from_pretrained(checkpoint, subfolder=name).state_dict(), saved[name], name)
    averaged = TinyDenoiser.from_pretrained(checkpoint, subfolder="denoiser_ema").parameters()
    assert_identical(list(averaged), saved["ema"]["shadow_params"], "denoiser_ema")

    resumed = _new_run(seed=1)  # other initial weights, all overwritten by the checkpoint
    assert not torch.equal(resumed.models["encoder"].proj.weight, saved["encoder"]["proj.weight"])
    resumed.accelerator.load_state(str(checkpoint))
    assert_identical(resumed.state(), saved)
    resumed.train(2)
    assert_identical(resumed.state(), first.state())


def test_a_checkpoint_of_other_models_is_an_error_naming_the_subfolder(tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint-1"
    run = Run(seed=0)
    run.train(1)
    run.accelerator.save_state(str(checkpoint))
    before = run.state()

    missing = tmp_path / "missing" / "checkpoint-1"
    shutil.copytree(checkpoint, missing)
    shutil.rmtree(missing / "encoder")
    with pytest.raises(ValueError, match=rf"checkpoint {missing}: no 'encoder' subfolder"):
        run.accelerator.load_state(str(missing))

    no_ema = tmp_path / "no-ema" / "checkpoint-1"
    shutil.copytree(checkpoint, no_ema)
    shutil.rmtree(no_ema / "denoiser_ema")
    with pytest.raises(ValueError, match=rf"checkpoint {no_ema}: no 'denoiser_ema' subfolder"):
        run.accelerator.load_state(str(no_ema))

    extra = tmp_path / "extra" / "checkpoint-1"
    shutil.copytree(checkpoint, extra)
    TinyAdapter(2).save_pretrained(extra / "fusion_adapter")
    with pytest.raises(ValueError, match=rf"checkpoint {extra}: a 'fusion_adapter' subfolder this run does not train"):
        run.accelerator.load_state(str(extra))
    assert_identical(run.state(), before)  # nothing was loaded from a mismatched checkpoint

    wider = tmp_path / "wider" / "checkpoint-1"
    shutil.copytree(checkpoint, wider)
    shutil.rmtree(wider / "adapter")
    TinyAdapter(5).save_pretrained(wider / "adapter")
    with pytest.raises(ValueError, match=rf"checkpoint {wider / 'adapter'}: does not fit this run's TinyAdapter"):
        run.accelerator.load_state(str(wider))


def test_hook_names_are_checked() -> None:
    accelerator = Accelerator(cpu=True)
    model = TinyAdapter(2)
    ema = EMAModel(model.parameters(), model_cls=TinyAdapter, model_config=model.config)
    with pytest.raises(ValueError, match="EMA for \\['encoder'\\] but no model of that name"):
        register_checkpoint_hooks(accelerator, {"adapter": model}, {"encoder": ema})
    with pytest.raises(ValueError, match="plain folder names"):
        register_checkpoint_hooks(accelerator, {"models/adapter": model})
    with pytest.raises(ValueError, match="ends with '_ema'"):
        register_checkpoint_hooks(accelerator, {"adapter": model, "adapter_ema": TinyAdapter(2)}, {"adapter": ema})


def test_a_run_without_ema_resumes_from_a_checkpoint_with_one_and_says_so(tmp_path, caplog) -> None:
    from ehr_diffusers.training.checkpointing import _check_subfolders

    for name in ("denoiser", "denoiser_ema"):
        TinyAdapter(2).save_pretrained(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="ehr_diffusers.training.checkpointing"):
        _check_subfolders(tmp_path, ["denoiser"], unused_ema=["denoiser_ema"])
    assert "'denoiser_ema' subfolder is not loaded" in caplog.text and "--use_ema" in caplog.text
    with pytest.raises(ValueError, match="a 'denoiser_ema' subfolder this run does not train"):
        _check_subfolders(tmp_path, ["denoiser"])  # a model the run does not know of is still refused
