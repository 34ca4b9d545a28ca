"""``PipelineContractTests``: the contract every ehr-diffusers pipeline keeps, as a mixin for its test class.

What users' diffusers tools assume of a pipeline (diffusers' own pipeline tests hold its pipelines to the same), plus
what this package promises on top: a saved folder loads by the pipeline class and by
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, weights are safetensors only, and
callbacks that return misfit tensors fail at once. Offline and on CPU, with tiny components built in code.

A test class sets the class attributes below and provides:

* ``get_dummy_components()``: the pipeline's ``__init__`` arguments, tiny and the same on every call (seeded), every
  ``nn.Module`` in eval mode;
* ``get_dummy_inputs(seed)``: ``__call__`` arguments for one sample, with
  ``generator=torch.Generator().manual_seed(seed)`` (a single CPU generator: the fresh-process test rebuilds it from
  the seed) and with every optional component's input given, so that the pipeline also runs without it;
* ``get_dummy_latents(seed)``: the starting noise (float32) of one sample of those inputs, so that runs in other dtypes
  start from the same point (``randn`` draws other numbers in other dtypes).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from ehr_diffusers.hub.export import parse_shim

# Arguments a diffusers pipeline call takes with a default (output_type and return_dict included).
OPTIONAL_CALL_ARGUMENTS = ("num_inference_steps", "generator", "latents", "output_type", "return_dict",
                           "callback_on_step_end", "callback_on_step_end_tensor_inputs")
SHIM_PATTERN = "from {package} import {name}  # noqa: F401\n"


def to_numpy(value: Any) -> np.ndarray:
    """A numeric pipeline output (tensor, array, list of images) as one float64 array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, (list, tuple)):
        return np.stack([np.asarray(item, dtype=np.float64) for item in value])
    return np.asarray(value, dtype=np.float64)


def model_index_classes(folder: str | Path) -> dict[str, type]:
    """Every class a saved ``model_index.json`` names (``_class_name`` for the pipeline), imported as diffusers' remote-
    code route imports it: through the one-line shim beside it (which must be nothing else), or through the recorded
    module path of a component without one (a folder saved before shims, or a diffusers component). A plain
    ``_class_name`` (folders saved before shims) names no module: it is the class the folder is loaded with."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    found = {}
    for key, value in index.items():
        if key == "_class_name" and isinstance(value, list):
            (library, name), code = value, folder / f"{value[0]}.py"
        elif not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None:
            (library, name), code = value, folder / key / f"{value[0]}.py"
        else:
            continue
        if code.is_file():
            shim = parse_shim(code.read_text())
            assert shim is not None and shim[1] == name, f"{code} is not a one-line shim importing {name}"
            library = shim[0]
        found[key] = getattr(importlib.import_module(library), name)
        assert isinstance(found[key], type), f"{key}: {library}.{name} is not a class"
    return found


def isolate_modules_cache(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Moves diffusers' remote-code module cache to ``folder`` for one test, so that loading with
    ``trust_remote_code=True`` writes nothing into the user's ``HF_MODULES_CACHE`` (read when diffusers is imported,
    hence patched where it is used)."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(folder))
    monkeypatch.setattr(sys, "path", list(sys.path))  # diffusers appends the cache folder
    for name in [name for name in sys.modules if name.split(".")[0] == "diffusers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    return folder


FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    from pathlib import Path

    import numpy, torch
    from diffusers import DiffusionPipeline

    folder, inputs_file, seed, output_field, module, class_name, out = sys.argv[1:]
    package = module.split(".")[0]
    report = {"package_imported_before_loading": package in sys.modules}

    def run(pipe, name):
        pipe.set_progress_bar_config(disable=True)
        inputs = torch.load(inputs_file, weights_only=True)
        value = getattr(pipe(**inputs, generator=torch.Generator().manual_seed(int(seed))), output_field)
        value = value.to("cpu", torch.float64).numpy() if torch.is_tensor(value) else numpy.asarray(value, "float64")
        numpy.save(Path(out, name + ".npy"), value)

    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipeline_class = getattr(importlib.import_module(module), class_name)
    report["remote_class_is_installed_class"] = type(remote) is pipeline_class
    run(remote, "remote")
    run(pipeline_class.from_pretrained(folder), "class")
    print(json.dumps(report))
""")


class PipelineContractTests:
    """Mixin of contract tests; see the module docstring for what a test class provides."""

    pipeline_class: ClassVar[type]
    # the output attribute that holds the generated samples ("records", "images")
    output_field: ClassVar[str]
    # the __call__ argument that sets how many samples one input makes, one generator each
    batch_argument: ClassVar[str]
    # every output_type the pipeline accepts; comparisons use numeric_output_type, dtype checks latent_output_type
    output_types: ClassVar[tuple[str, ...]]
    numeric_output_type: ClassVar[str] = "np"
    latent_output_type: ClassVar[str] = "latent"
    # the __call__ argument for classifier-free guidance, None if the pipeline has none
    guidance_argument: ClassVar[str | None] = "guidance_scale"
    # dtype -> largest mean absolute difference of latent outputs from float32, starting from the same noise
    dtype_tolerances: ClassVar[dict[torch.dtype, float]] = {torch.float64: 1e-4}
    # components diffusers' layerwise-casting test casts (it looks for these names)
    layerwise_casting_components: ClassVar[tuple[str, ...]] = ("unet", "transformer")
    # largest absolute difference between sample i of a batch and the same seed alone (batched matmuls round apart)
    batch_tolerance: ClassVar[float] = 1e-5

    # ------------------------------------------------------------------ provided by the test class
    def get_dummy_components(self) -> dict[str, Any]:
        raise NotImplementedError

    def get_dummy_inputs(self, seed: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def get_dummy_latents(self, seed: int = 0) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @pytest.fixture
    def isolated_modules_cache(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        return isolate_modules_cache(tmp_path / "hf-modules", monkeypatch)

    def make_pipeline(self, **overrides: Any):
        pipe = self.pipeline_class(**{**self.get_dummy_components(), **overrides})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run_pipeline(self, pipe, seed: int = 0, **overrides: Any) -> np.ndarray:
        """The numeric output of one call on the dummy inputs."""
        inputs = {**self.get_dummy_inputs(seed), "output_type": self.numeric_output_type, **overrides}
        return to_numpy(getattr(pipe(**inputs), self.output_field))

    def batch_inputs(self, seeds: list[int]) -> dict[str, Any]:
        """The dummy inputs for ``len(seeds)`` samples, sample i drawn from a generator seeded ``seeds[i]``."""
        inputs = self.get_dummy_inputs(seeds[0])
        inputs[self.batch_argument] = len(seeds)
        inputs["generator"] = [torch.Generator().manual_seed(seed) for seed in seeds]
        return inputs

    @property
    def package(self) -> str:
        return self.pipeline_class.__module__.split(".")[0]

    def assert_same_output(self, pipe, other, seed: int = 0) -> None:
        np.testing.assert_array_equal(self.run_pipeline(other, seed), self.run_pipeline(pipe, seed))

    # ------------------------------------------------------------------ call signature and outputs
    def test_call_signature_has_diffusers_defaults(self) -> None:
        parameters = inspect.signature(self.pipeline_class.__call__).parameters
        for name in (*OPTIONAL_CALL_ARGUMENTS, self.batch_argument):
            assert name in parameters, f"__call__ lacks {name}"
            assert parameters[name].default is not inspect.Parameter.empty, f"__call__ argument {name} has no default"
        assert parameters["return_dict"].default is True
        assert parameters["output_type"].default in self.output_types

    def test_every_output_type_and_return_dict_false(self) -> None:
        pipe = self.make_pipeline()
        for output_type in self.output_types:
            out = pipe(**{**self.get_dummy_inputs(0), "output_type": output_type})
            value = getattr(out, self.output_field)
            assert len(value) == 1, f"output_type {output_type!r}: one input gave {len(value)} samples"
            (first, *_) = pipe(**{**self.get_dummy_inputs(0), "output_type": output_type, "return_dict": False})
            if isinstance(value, torch.Tensor):
                assert torch.equal(first, value), output_type
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(first, value)
            elif hasattr(value, "equals"):
                assert value.equals(first), output_type
            else:
                assert first == value, output_type
        latent = getattr(pipe(**{**self.get_dummy_inputs(0), "output_type": self.latent_output_type}),
                         self.output_field)
        assert isinstance(latent, torch.Tensor), "the latent output type returns the raw tensor"

    def test_progress_bar_shows_steps_and_can_be_disabled(self, capsys: pytest.CaptureFixture) -> None:
        pipe = self.make_pipeline()
        pipe.set_progress_bar_config(disable=False)
        steps = self.get_dummy_inputs(0)["num_inference_steps"]
        pipe(**self.get_dummy_inputs(0))
        assert f"{steps}/{steps}" in capsys.readouterr().err
        pipe.set_progress_bar_config(disable=True)
        pipe(**self.get_dummy_inputs(0))
        assert capsys.readouterr().err == ""

    def test_guidance_keeps_the_output_shape_and_changes_the_output(self) -> None:
        if self.guidance_argument is None:
            pytest.skip("the pipeline has no classifier-free guidance")
        pipe = self.make_pipeline()
        plain = self.run_pipeline(pipe, **{self.guidance_argument: 1.0})
        guided = self.run_pipeline(pipe, output_type=self.latent_output_type, **{self.guidance_argument: 6.0})
        unguided = self.run_pipeline(pipe, output_type=self.latent_output_type, **{self.guidance_argument: 1.0})
        assert plain.shape == self.run_pipeline(pipe, **{self.guidance_argument: 6.0}).shape
        assert guided.shape == unguided.shape and not np.array_equal(guided, unguided)

    # ------------------------------------------------------------------ generators and batches
    def test_same_seed_same_output_other_seed_other_output(self) -> None:
        pipe = self.make_pipeline()
        latent = self.latent_output_type
        np.testing.assert_array_equal(self.run_pipeline(pipe, 3, output_type=latent),
                                      self.run_pipeline(pipe, 3, output_type=latent))
        assert not np.array_equal(self.run_pipeline(pipe, 3, output_type=latent),
                                  self.run_pipeline(pipe, 4, output_type=latent))

    def test_sample_of_a_batch_equals_its_seed_alone(self) -> None:
        pipe = self.make_pipeline()
        for output_type in (self.latent_output_type, self.numeric_output_type):
            batch = to_numpy(getattr(pipe(**{**self.batch_inputs([10, 11, 12]), "output_type": output_type}),
                                     self.output_field))
            assert len(batch) == 3
            for index, seed in enumerate((10, 11, 12)):
                alone = to_numpy(getattr(pipe(**{**self.batch_inputs([seed]), "output_type": output_type}),
                                         self.output_field))
                np.testing.assert_allclose(batch[index], alone[0], atol=self.batch_tolerance, rtol=0,
                                           err_msg=f"sample {index} ({output_type})")

    def test_rows_of_one_batch_are_independent(self) -> None:
        """One generator draws different noise for each row; one seed per row gives equal rows (diffusers' contract
        does not catch a generator reused for every row)."""
        pipe = self.make_pipeline()
        inputs = {**self.get_dummy_inputs(0), self.batch_argument: 3, "output_type": self.latent_output_type}
        rows = to_numpy(getattr(pipe(**inputs), self.output_field))
        assert not any(np.array_equal(rows[i], rows[j]) for i in range(3) for j in range(i + 1, 3))
        same = to_numpy(getattr(pipe(**{**self.batch_inputs([5, 5, 5]), "output_type": self.latent_output_type}),
                                self.output_field))
        np.testing.assert_allclose(same[1], same[0], atol=self.batch_tolerance, rtol=0)
        np.testing.assert_allclose(same[2], same[0], atol=self.batch_tolerance, rtol=0)

    def test_generator_list_of_the_wrong_length_is_refused(self) -> None:
        inputs = self.batch_inputs([1, 2, 3])
        inputs["generator"] = inputs["generator"][:2]
        with pytest.raises(ValueError, match="generator"):
            self.make_pipeline()(**inputs)

    # ------------------------------------------------------------------ callbacks
    def test_callback_can_replace_the_latents(self) -> None:
        pipe = self.make_pipeline()
        steps: list[int] = []

        def callback(pipeline, step, timestep, tensors):
            steps.append(step)
            assert set(tensors) == {"latents"}
            return {"latents": torch.zeros_like(tensors["latents"])}

        out = pipe(**{**self.get_dummy_inputs(0), "output_type": self.latent_output_type,
                      "callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]})
        assert steps == list(range(self.get_dummy_inputs(0)["num_inference_steps"])) == list(range(pipe.num_timesteps))
        assert torch.count_nonzero(getattr(out, self.output_field)) == 0

    def test_callback_gets_every_tensor_input_and_returning_them_changes_nothing(self) -> None:
        from diffusers.callbacks import PipelineCallback

        pipe = self.make_pipeline()
        names = list(pipe._callback_tensor_inputs)
        seen: list[set[str]] = []

        def callback(pipeline, step, timestep, tensors):
            seen.append({name for name, value in tensors.items() if isinstance(value, torch.Tensor)})
            return tensors

        expected = self.run_pipeline(pipe)
        np.testing.assert_array_equal(self.run_pipeline(pipe, callback_on_step_end=callback,
                                                        callback_on_step_end_tensor_inputs=names), expected)
        assert seen and all(found == set(names) for found in seen)

        class Passthrough(PipelineCallback):
            tensor_inputs = names

            def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
                return callback_kwargs

        np.testing.assert_array_equal(self.run_pipeline(pipe, callback_on_step_end=Passthrough()), expected)

    def test_callback_outputs_that_do_not_fit_are_named(self) -> None:
        pipe = self.make_pipeline()
        names = list(pipe._callback_tensor_inputs)

        def call(make_output):
            return pipe(**{**self.get_dummy_inputs(0), "callback_on_step_end_tensor_inputs": names,
                           "callback_on_step_end": lambda pipeline, step, t, tensors: make_output(tensors)})

        for name in names:
            with pytest.raises(ValueError, match=rf"{name} with shape .*expected a tensor of shape"):
                call(lambda tensors, name=name: {name: torch.cat([tensors[name], tensors[name][:1]])})
            with pytest.raises(ValueError, match=rf"{name} with shape .*expected a tensor of shape"):
                call(lambda tensors, name=name: {name: tensors[name][..., :-1]})
            with pytest.raises(ValueError, match=rf"{name} with list; expected"):
                call(lambda tensors, name=name: {name: tensors[name].tolist()})
        with pytest.raises(ValueError, match="must return a dict"):
            call(lambda tensors: None)
        with pytest.raises(ValueError, match="returned 'noise'"):
            call(lambda tensors: {**tensors, "noise": tensors["latents"]})

    def test_interrupt_stops_the_loop_at_that_step(self) -> None:
        if not isinstance(getattr(self.pipeline_class, "interrupt", None), property):
            pytest.skip("the pipeline has no interrupt property")
        pipe = self.make_pipeline()
        captured: dict[str, torch.Tensor] = {}

        def callback(pipeline, step, timestep, tensors):
            if step == 0:
                pipeline._interrupt = True
                captured["latents"] = tensors["latents"].clone()
            return tensors

        out = pipe(**{**self.get_dummy_inputs(0), "output_type": self.latent_output_type,
                      "callback_on_step_end": callback})
        torch.testing.assert_close(getattr(out, self.output_field), captured["latents"], rtol=0, atol=0)

    # ------------------------------------------------------------------ components, dtypes and devices
    def test_components_round_trip(self) -> None:
        pipe = self.make_pipeline()
        components = pipe.components
        assert set(components) <= set(inspect.signature(self.pipeline_class.__init__).parameters)
        assert set(self.pipeline_class._optional_components) <= set(components)
        rebuilt = self.pipeline_class(**components)
        rebuilt.set_progress_bar_config(disable=True)
        assert all(getattr(rebuilt, name) is component for name, component in components.items())
        self.assert_same_output(pipe, rebuilt)

    def test_from_pipe_keeps_the_config_and_the_output(self) -> None:
        pipe = self.make_pipeline()
        again = self.pipeline_class.from_pipe(pipe)
        again.set_progress_bar_config(disable=True)
        assert {k: v for k, v in again.config.items() if k != "_name_or_path"} == {
            k: v for k, v in pipe.config.items() if k != "_name_or_path"}
        self.assert_same_output(pipe, again)

    def test_to_dtype(self) -> None:
        reference = self.make_pipeline()
        noise = self.get_dummy_latents(0)
        expected = self.run_pipeline(reference, latents=noise, output_type=self.latent_output_type)
        for dtype, tolerance in self.dtype_tolerances.items():
            pipe = self.make_pipeline().to(dtype)
            assert pipe.dtype == dtype
            for name, component in pipe.components.items():
                if isinstance(component, torch.nn.Module):
                    assert {p.dtype for p in component.parameters()} == {dtype}, f"{name} in {dtype}"
            latent = getattr(pipe(**{**self.get_dummy_inputs(0), "latents": noise,
                                     "output_type": self.latent_output_type}), self.output_field)
            assert latent.dtype == dtype
            assert np.abs(to_numpy(latent) - expected).mean() <= tolerance, dtype
            assert np.isfinite(self.run_pipeline(pipe)).all(), dtype

    def test_float64_and_back_gives_the_same_output(self) -> None:
        """Widening and narrowing again rounds every weight back to itself."""
        pipe = self.make_pipeline()
        expected = self.run_pipeline(pipe)
        pipe.to(torch.float64).to(torch.float32)
        assert pipe.dtype == torch.float32
        np.testing.assert_array_equal(self.run_pipeline(pipe), expected)

    def test_to_device_cpu(self) -> None:
        pipe = self.make_pipeline()
        expected = self.run_pipeline(pipe)
        moved = pipe.to("cpu")
        assert moved.device.type == "cpu" and moved._execution_device.type == "cpu"
        assert all(p.device.type == "cpu" for c in moved.components.values() if isinstance(c, torch.nn.Module)
                   for p in c.parameters())
        np.testing.assert_array_equal(self.run_pipeline(pipe.to(device="cpu", dtype=torch.float32)), expected)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_to_device_cuda(self) -> None:
        pipe = self.make_pipeline()
        noise = self.get_dummy_latents(0)
        expected = self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type)
        pipe.to("cuda")
        assert pipe.device.type == "cuda"
        on_device = self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type)
        np.testing.assert_allclose(on_device, expected, atol=1e-3, rtol=1e-3)

    @pytest.mark.skipif(not torch.cuda.is_available(),
                        reason="enable_model_cpu_offload and enable_sequential_cpu_offload need an accelerator")
    def test_cpu_offload_gives_the_same_output(self) -> None:
        noise = self.get_dummy_latents(0)
        expected = self.run_pipeline(self.make_pipeline().to("cuda"), latents=noise,
                                     output_type=self.latent_output_type)
        for enable in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
            pipe = self.make_pipeline()
            getattr(pipe, enable)()
            for _ in range(2):  # offloading hooks must survive a second call
                np.testing.assert_allclose(self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type),
                                           expected, atol=1e-3, rtol=1e-3, err_msg=enable)

    def test_layerwise_casting(self) -> None:
        pipe = self.make_pipeline()
        names = [name for name in self.layerwise_casting_components if getattr(pipe, name, None) is not None]
        if not names:
            wanted = " or ".join(self.layerwise_casting_components)
            pytest.skip(f"diffusers' layerwise-casting test casts a component named {wanted}; this pipeline has none")
        expected = self.run_pipeline(pipe, output_type=self.latent_output_type)
        for name in names:
            getattr(pipe, name).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        cast = self.run_pipeline(pipe, output_type=self.latent_output_type)
        assert cast.shape == expected.shape and np.isfinite(cast).all()

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="group offloading onloads to an accelerator")
    def test_group_offloading(self) -> None:
        pipe = self.make_pipeline()
        names = [name for name in self.layerwise_casting_components if getattr(pipe, name, None) is not None]
        if not names:
            wanted = " or ".join(self.layerwise_casting_components)
            pytest.skip(f"diffusers' group-offloading test offloads a component named {wanted}; this pipeline has none")
        noise = self.get_dummy_latents(0)
        expected = self.run_pipeline(self.make_pipeline().to("cuda"), latents=noise,
                                     output_type=self.latent_output_type)
        pipe.to("cuda")
        for name in names:
            getattr(pipe, name).to("cpu").enable_group_offload(torch.device("cuda"), offload_type="block_level",
                                                              num_blocks_per_group=1)
        np.testing.assert_allclose(self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type),
                                   expected, atol=1e-3, rtol=1e-3)

    def test_optional_components_may_be_none(self, tmp_path: Path, isolated_modules_cache: Path) -> None:
        from diffusers import DiffusionPipeline

        for name in self.pipeline_class._optional_components:
            pipe = self.make_pipeline(**{name: None})
            assert getattr(pipe, name) is None and pipe.components[name] is None
            expected = self.run_pipeline(pipe)
            rebuilt = self.pipeline_class(**pipe.components)
            rebuilt.set_progress_bar_config(disable=True)
            self.assert_same_output(pipe, rebuilt)
            self.assert_same_output(pipe, self.pipeline_class.from_pipe(pipe))
            folder = tmp_path / f"without-{name}"
            pipe.save_pretrained(folder)
            assert json.loads((folder / "model_index.json").read_text())[name] == [None, None]
            for loaded in (self.pipeline_class.from_pretrained(folder),
                           DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
                loaded.set_progress_bar_config(disable=True)
                assert getattr(loaded, name) is None
                np.testing.assert_array_equal(self.run_pipeline(loaded), expected)
            assert np.isfinite(self.run_pipeline(pipe.to(torch.float64))).all()

    # ------------------------------------------------------------------ saving and loading
    def test_save_load_round_trip(self, tmp_path: Path) -> None:
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        weights = sorted(p.name for p in (tmp_path / "saved").rglob("*") if p.suffix in (".bin", ".pt", ".pth",
                                                                                         ".safetensors"))
        assert weights and all(name.endswith(".safetensors") for name in weights)
        loaded = self.pipeline_class.from_pretrained(tmp_path / "saved")
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is self.pipeline_class
        for name, component in pipe.components.items():
            assert type(getattr(loaded, name)) is type(component), name
        self.assert_same_output(pipe, loaded)
        self.assert_same_output(pipe, loaded, seed=7)

    def test_save_load_with_a_variant(self, tmp_path: Path) -> None:
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved", variant="fp16")
        weights = [p for p in (tmp_path / "saved").rglob("*") if p.suffix in (".bin", ".safetensors")]
        modules = [name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
        assert sorted(p.parent.name for p in weights) == sorted(modules)
        assert all(p.name.endswith(".fp16.safetensors") for p in weights), weights
        loaded = self.pipeline_class.from_pretrained(tmp_path / "saved", variant="fp16")
        loaded.set_progress_bar_config(disable=True)
        self.assert_same_output(pipe, loaded)
        with pytest.raises(ValueError, match="variant=no-such"):
            self.pipeline_class.from_pretrained(tmp_path / "saved", variant="no-such")

    def test_every_component_save_takes_diffusers_arguments(self) -> None:
        """DiffusionPipeline.save_pretrained passes safe_serialization, variant and max_shard_size only to a save
        method whose signature lists them: **kwargs alone would drop them silently."""
        for name, component in self.make_pipeline().components.items():
            if isinstance(component, torch.nn.Module):
                parameters = inspect.signature(component.save_pretrained).parameters
                missing = {"safe_serialization", "variant", "max_shard_size", "push_to_hub"} - set(parameters)
                assert not missing, f"{name}.save_pretrained does not list {sorted(missing)}"

    def test_save_load_in_shards(self, tmp_path: Path) -> None:
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved", max_shard_size="20KB", variant="v1")
        assert list((tmp_path / "saved").rglob("*.safetensors.index.v1.json")), "nothing was sharded"
        loaded = self.pipeline_class.from_pretrained(tmp_path / "saved", variant="v1")
        loaded.set_progress_bar_config(disable=True)
        self.assert_same_output(pipe, loaded)

    def test_save_load_in_another_dtype(self, tmp_path: Path) -> None:
        noise = self.get_dummy_latents(0)
        for dtype in self.dtype_tolerances:
            pipe = self.make_pipeline().to(dtype)
            folder = tmp_path / str(dtype)
            pipe.save_pretrained(folder)
            loaded = self.pipeline_class.from_pretrained(folder, dtype=dtype)
            loaded.set_progress_bar_config(disable=True)
            for name, component in loaded.components.items():
                if isinstance(component, torch.nn.Module):
                    assert component.dtype == dtype, f"{name} loaded in {component.dtype}, not {dtype}"
            np.testing.assert_array_equal(
                self.run_pipeline(loaded, latents=noise, output_type=self.latent_output_type),
                self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type))

    def test_pickle_serialization_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="safetensors only"):
            self.make_pipeline().save_pretrained(tmp_path / "saved", safe_serialization=False)
        assert not [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    def test_saved_folder_is_in_remote_code_form(self, tmp_path: Path) -> None:
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        folder = tmp_path / "saved"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline", self.pipeline_class.__name__]
        assert "_name_or_path" not in index
        assert (folder / "pipeline.py").read_text() == SHIM_PATTERN.format(package=self.package,
                                                                           name=self.pipeline_class.__name__)
        for name, component in pipe.components.items():
            if component is None:
                assert index[name] == [None, None]
                continue
            module = type(component).__module__
            if module.split(".")[0] == self.package:
                file = module.rsplit(".", 1)[-1]
                assert index[name] == [file, type(component).__name__]
                assert (folder / name / f"{file}.py").read_text() == SHIM_PATTERN.format(
                    package=self.package, name=type(component).__name__)
        for key, cls in model_index_classes(folder).items():
            expected = self.pipeline_class if key == "_class_name" else type(getattr(pipe, key))
            assert cls is expected, key
            assert cls is getattr(importlib.import_module(self.package), cls.__name__), f"{key}: not a root export"

    def test_class_route_runs_no_remote_code(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers.pipelines import pipeline_loading_utils

        def refuse(*args, **kwargs):
            raise AssertionError("the class route ran remote code")

        monkeypatch.setattr(pipeline_loading_utils, "get_class_from_dynamic_module", refuse)
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        loaded = self.pipeline_class.from_pretrained(tmp_path / "saved")
        loaded.set_progress_bar_config(disable=True)
        self.assert_same_output(pipe, loaded)

    def test_remote_code_route_returns_the_installed_classes(self, tmp_path: Path,
                                                             isolated_modules_cache: Path) -> None:
        from diffusers import DiffusionPipeline

        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            DiffusionPipeline.from_pretrained(tmp_path / "saved")
        loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is self.pipeline_class
        for name, component in pipe.components.items():
            assert type(getattr(loaded, name)) is type(component), name
        self.assert_same_output(pipe, loaded)
        cached = {p.name for p in isolated_modules_cache.rglob("*.py")} - {"__init__.py"}
        assert cached == {p.name for p in (tmp_path / "saved").rglob("*.py")}

    def test_resaved_pipeline_loads_by_both_routes(self, tmp_path: Path, isolated_modules_cache: Path) -> None:
        from diffusers import DiffusionPipeline

        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        expected = self.run_pipeline(pipe)
        def remote_code_form(folder: Path) -> dict[Path, bytes]:
            return {p.relative_to(folder): p.read_bytes() for p in [folder / "model_index.json", *folder.rglob("*.py")]}

        reference = remote_code_form(tmp_path / "saved")
        routes = {"class": lambda folder: self.pipeline_class.from_pretrained(folder),
                  "remote": lambda folder: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)}
        for first, load_first in routes.items():
            folder = tmp_path / f"resaved-by-{first}"
            load_first(tmp_path / "saved").save_pretrained(folder)
            assert remote_code_form(folder) == reference, f"re-saved after the {first} route"
            for second, load_second in routes.items():
                loaded = load_second(folder)
                loaded.set_progress_bar_config(disable=True)
                assert type(loaded) is self.pipeline_class
                np.testing.assert_array_equal(self.run_pipeline(loaded), expected, err_msg=f"{first}, {second}")

    def test_code_that_is_not_a_shim_still_needs_trust_remote_code(self, tmp_path: Path) -> None:
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
        component = next(key for key, value in index.items() if isinstance(value, list) and value[0]
                         and (tmp_path / "saved" / key / f"{value[0]}.py").is_file())
        edits = {
            "pipeline.py": lambda text: text + "print('side effect')\n",
            f"{component}/{index[component][0]}.py": lambda text: text.replace(self.package, "os", 1),
        }
        for relative, edit in edits.items():
            folder = tmp_path / relative.replace("/", "-")
            shutil.copytree(tmp_path / "saved", folder)
            (folder / relative).write_text(edit((folder / relative).read_text()))
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                self.pipeline_class.from_pretrained(folder)

    def test_hub_download_fetches_the_checked_commit_without_trusting_code(self, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """A Hub repo is read at one commit; only when its every code file is a shim of this package is that commit
        fetched as a snapshot and loaded as a local folder, with ``trust_remote_code`` never turned on. Anything else
        (other code, a custom pipeline, the user's own trust) goes through diffusers' download as it was asked.
        (The Hub is replaced by recorders: offline.)"""
        import huggingface_hub
        from diffusers import DiffusionPipeline
        from huggingface_hub.errors import EntryNotFoundError

        commit = "0123456789abcdef0123456789abcdef01234567"
        snapshot = tmp_path / "models--me--model" / "snapshots" / commit
        self.make_pipeline().save_pretrained(snapshot)
        requests: list[tuple[str, str | None]] = []

        def fake_hf_hub_download(repo_id, filename, revision=None, **kwargs):
            requests.append((filename, revision))
            if not (snapshot / filename).is_file():
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            return str(snapshot / filename)

        snapshots: list[dict[str, Any]] = []
        downloads: list[dict[str, Any]] = []
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download",
                            lambda repo_id, **kwargs: snapshots.append(kwargs) or str(snapshot))
        monkeypatch.setattr(DiffusionPipeline, "download",
                            classmethod(lambda cls, name, **kwargs: downloads.append(kwargs) or str(snapshot)))

        assert self.pipeline_class.download("me/model", revision="main", token="hf_x") == str(snapshot)
        assert snapshots[-1] == {"revision": commit, "token": "hf_x"} and downloads == []
        assert requests[0] == ("model_index.json", "main") and {rev for _, rev in requests[1:]} == {commit}
        loaded = self.pipeline_class.from_pretrained("me/model")  # the snapshot as the Hub cache would hold it
        loaded.set_progress_bar_config(disable=True)
        self.assert_same_output(self.make_pipeline(), loaded)
        assert downloads == []

        self.pipeline_class.download("me/model", trust_remote_code=True)  # the user's own choice is kept
        assert downloads[-1] == {"trust_remote_code": True}
        self.pipeline_class.download("me/model", custom_pipeline="someone/else")
        assert downloads[-1] == {"custom_pipeline": "someone/else"}
        index = json.loads((snapshot / "model_index.json").read_text())
        for edit in ({"_ignore_files": ["pipeline.py"]}, {"_class_name": ["someone/else", index["_class_name"][1]]}):
            (snapshot / "model_index.json").write_text(json.dumps({**index, **edit}))
            self.pipeline_class.download("me/model", revision="main")
            assert downloads[-1] == {"revision": "main"}, edit
        (snapshot / "model_index.json").write_text(json.dumps(index))
        (snapshot / "pipeline.py").write_text("import os  # noqa: F401\n")
        self.pipeline_class.download("me/model", revision="main")
        assert downloads[-1] == {"revision": "main"} and len(snapshots) == 2

    @pytest.mark.slow
    def test_fresh_process_loads_by_both_routes(self, tmp_path: Path) -> None:
        """A fresh interpreter (nothing of the package imported, Hub offline, a private module cache) loads the saved
        folder with ``DiffusionPipeline.from_pretrained(trust_remote_code=True)`` first, then with the class."""
        pipe = self.make_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        inputs = {**self.get_dummy_inputs(3), "output_type": self.numeric_output_type}
        inputs.pop("generator")
        torch.save(inputs, tmp_path / "inputs.pt")
        expected = self.run_pipeline(pipe, 3)
        modules_cache = tmp_path / "hf-modules"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(modules_cache),
               "HF_HOME": str(tmp_path / "hf-home")}
        finished = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(tmp_path / "saved"), str(tmp_path / "inputs.pt"), "3",
             self.output_field, self.pipeline_class.__module__, self.pipeline_class.__name__, str(tmp_path)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        report = json.loads(finished.stdout.strip().splitlines()[-1])
        assert report == {"package_imported_before_loading": False, "remote_class_is_installed_class": True}
        for route in ("remote", "class"):
            np.testing.assert_array_equal(np.load(tmp_path / f"{route}.npy"), expected, err_msg=route)
        cached = {p.name for p in modules_cache.rglob("*.py")} - {"__init__.py"}
        assert cached == {p.name for p in (tmp_path / "saved").rglob("*.py")}

    # ------------------------------------------------------------------ diffusers tests that cannot apply
    def test_save_load_dduf(self) -> None:
        pytest.skip("diffusers 0.42 removed DDUF loading (from_pretrained(dduf_file=...) raises)")

    def test_attention_slicing_keeps_the_output(self) -> None:
        pipe = self.make_pipeline()
        expected = self.run_pipeline(pipe)
        pipe.enable_attention_slicing(slice_size=1)
        np.testing.assert_allclose(self.run_pipeline(pipe), expected, atol=1e-5, rtol=0)
        pipe.disable_attention_slicing()
        np.testing.assert_array_equal(self.run_pipeline(pipe), expected)

    @pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None,
                        reason="xformers attention runs only on CUDA with the xformers package (not a dependency)")
    def test_xformers_attention_keeps_the_output(self) -> None:
        pipe = self.make_pipeline().to("cuda")
        noise = self.get_dummy_latents(0)
        expected = self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type)
        pipe.enable_xformers_memory_efficient_attention()
        np.testing.assert_allclose(self.run_pipeline(pipe, latents=noise, output_type=self.latent_output_type),
                                   expected, atol=1e-3, rtol=1e-3)
