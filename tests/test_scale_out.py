"""Data-parallel training: the ``accelerate launch`` command lines and their checks, both pipelines trained from the CLI
by 2 CPU processes over gloo (resumed bit-identically from a mid-epoch checkpoint, with only the main process
writing), checkpoints refused under another batch layout, and the X-ray latent cache (2 processes = 1 process,
resumable by shard, refused for another VAE)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import prepare_demo_cxr, reset_accelerate_state
from ehr_diffusers.cli import main
from ehr_diffusers.commands.launch import LaunchOptions, check_launch, launch_command
from ehr_diffusers.errors import ArgumentError, DataError
from ehr_diffusers.training import checkpointing

AUDIT = Path(__file__).parent / "write_audit"


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# ---------------------------------------------------------------------------------------------- launch command lines
def test_several_cpu_processes_are_accelerates_torchrun_launch_with_gloo(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    command, env = launch_command("pkg.script", ["--x", "1"], LaunchOptions(num_processes=2), cuda_devices=0,
                                  cpu_threads=1)
    assert "--multi_gpu" in command and "--cpu" not in command and env["ACCELERATE_USE_CPU"] == "true"
    assert _flag(command, "--num_processes") == "2" and _flag(command, "--main_process_port") == "0"  # a free port
    assert env["OMP_NUM_THREADS"] == "1" and command[-4:] == ["-m", "pkg.script", "--x", "1"]
    _, env = launch_command("pkg.script", [], LaunchOptions(num_processes=2), cuda_devices=0)
    assert int(env["OMP_NUM_THREADS"]) == max(1, len(os.sched_getaffinity(0)) // 2)  # torchrun would set 1


def test_one_cpu_process_and_gpu_processes(monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    command, env = launch_command("m", [], LaunchOptions(), cuda_devices=0)
    assert "--cpu" in command and "--multi_gpu" not in command and "ACCELERATE_USE_CPU" not in env
    assert _flag(command, "--num_processes") == "1" and _flag(command, "--mixed_precision") == "no"
    command, env = launch_command("m", [], LaunchOptions(num_processes=4, mixed_precision="bf16"), cuda_devices=4)
    assert "--multi_gpu" in command and "--cpu" not in command and "ACCELERATE_USE_CPU" not in env
    assert _flag(command, "--mixed_precision") == "bf16"


def test_multi_node_and_accelerate_config(tmp_path) -> None:
    options = LaunchOptions(num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    command, _ = launch_command("m", [], options, cuda_devices=8)
    assert (_flag(command, "--num_machines"), _flag(command, "--machine_rank"), _flag(command, "--main_process_ip"),
            _flag(command, "--main_process_port")) == ("2", "1", "10.0.0.1", "29500")
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 8\n")
    command, _ = launch_command("m", [], LaunchOptions(config_file=config), cuda_devices=8)
    assert _flag(command, "--config_file") == str(config)
    assert not {"--num_processes", "--mixed_precision", "--multi_gpu", "--cpu"} & set(command)  # the config's own
    command, _ = launch_command("m", [], LaunchOptions(num_processes=4, config_file=config), cuda_devices=8)
    assert _flag(command, "--num_processes") == "4" and "--multi_gpu" not in command  # overrides; FSDP launches
    single = tmp_path / "single.yaml"
    single.write_text("distributed_type: 'NO'\nmixed_precision: bf16\n")
    command, _ = launch_command("m", [], LaunchOptions(num_processes=8, config_file=single), cuda_devices=8)
    assert "--multi_gpu" in command  # accelerate's simple launch, which a one-process config picks, starts one


@pytest.mark.parametrize("options, devices, message", [
    (LaunchOptions(num_processes=3), 2, "3: 3 process(es) per machine, but this machine has 2 GPU"),
    (LaunchOptions(num_processes=16, num_machines=2, machine_rank=0, main_process_ip="h"), 4, "8 process(es)"),
    (LaunchOptions(num_processes=2, num_machines=2, main_process_ip="h"), 0, "--machine-rank"),
    (LaunchOptions(main_process_ip="h"), 0, "--main-process-ip only apply to several machines"),
])
def test_launch_checks_name_the_option(options, devices, message) -> None:
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch(options, devices)


def test_a_checkpoint_of_another_batch_layout_is_refused(tmp_path) -> None:
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    layout = {"num_processes": 2, "train_batch_size": 8, "gradient_accumulation_steps": 1}
    (folder / checkpointing.TRAINING_STATE_NAME).write_text(json.dumps({"step": 4, **layout}))
    checkpointing.check_layout(folder, layout)
    with pytest.raises(ArgumentError, match="written with processes 2, batch per process 8, this run has processes "
                                            "1, batch per process 16.*--num-processes 2"):
        checkpointing.check_layout(folder, {**layout, "num_processes": 1, "train_batch_size": 16})
    (folder / checkpointing.TRAINING_STATE_NAME).unlink()  # written before the layout was recorded: RNG files count
    for rank in range(2):
        (folder / f"random_states_{rank}.pkl").write_bytes(b"")
    assert checkpointing.checkpoint_layout(folder) == {"num_processes": 2}
    with pytest.raises(ArgumentError, match="processes 2"):
        checkpointing.check_layout(folder, {**layout, "num_processes": 1})


# ---------------------------------------------------------------------------------------------- 2 processes, CLI
@pytest.fixture
def two_processes(tmp_path, monkeypatch) -> Path:
    """Every process started from here logs the writes of ranks > 0 (tests/write_audit) to the returned file stem;
    one thread each, so that 1 and 2 processes compute alike; CPUs only, on a GPU machine too."""
    from ehr_diffusers.commands import cxr_data, launch, train

    for module in (cxr_data, launch, train):
        monkeypatch.setattr(module, "cuda_device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("EHR_WRITE_AUDIT", str(tmp_path / "writes"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "writes"


def _rank_writes(audit: Path, root: Path) -> set[tuple[str, str]]:
    """The writes of rank 1 under ``root``, as (event, path relative to root)."""
    log = audit.with_name(f"{audit.name}.rank1")
    assert log.is_file(), "no process of rank 1 ran"
    found = set()
    for line in log.read_text().splitlines():
        event, path = line.split("\t")
        if Path(path).is_relative_to(root):
            found.add((event, str(Path(path).relative_to(root))))
    return found


def _assert_only_checkpoint_folders(writes: set[tuple[str, str]]) -> None:
    """accelerate's save_state makes the checkpoint folder on every process (and each saves its RNG state with
    torch.save, which the audit does not see); nothing else may come from rank 1."""
    other = {(event, path) for event, path in writes
             if not (event == "os.mkdir" and Path(path).name.startswith(checkpointing.CHECKPOINT_PREFIX))}
    assert not other, f"rank 1 wrote {sorted(other)[:10]}"


def _same_weights(first: Path, second: Path) -> None:
    from safetensors.torch import load_file

    (a,), (b,) = first.glob("*.safetensors"), second.glob("*.safetensors")
    expected, actual = load_file(a), load_file(b)
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected), first


@pytest.mark.slow
def test_train_ehr_on_two_cpu_processes_resumes_bit_identically(labelled_demo_dataset, tmp_path, two_processes
                                                                 ) -> None:
    """800 train rows, 256 per process: 2 steps an epoch, so checkpoint-3 falls mid-epoch in both runs. Stopped
    after the autoencoder's checkpoint-3, or after the diffusion model's, and resumed: the weights of the run never
    stopped."""
    arguments = ["--dataset", str(labelled_demo_dataset), "--preset", "demo", "--autoencoder-epochs", "2",
                 "--diffusion-steps", "5", "--checkpointing-steps", "3", "--num-processes", "2", "-q"]
    whole = tmp_path / "whole"
    assert main(["train-ehr", "--output-dir", str(whole), *arguments]) == 0
    state = json.loads((whole / "model" / "checkpoint-3" / checkpointing.TRAINING_STATE_NAME).read_text())
    assert state == {"step": 3, "num_processes": 2, "train_batch_size": 256, "gradient_accumulation_steps": 1}
    assert {path.name for path in (whole / "model" / "checkpoint-3").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    _assert_only_checkpoint_folders(_rank_writes(two_processes, tmp_path))

    in_autoencoder, in_diffusion = tmp_path / "in-autoencoder", tmp_path / "in-diffusion"
    shutil.copytree(whole / "autoencoder-training" / "checkpoint-3", in_autoencoder / "autoencoder-training" /
                    "checkpoint-3")
    shutil.copytree(whole / "autoencoder-training", in_diffusion / "autoencoder-training")
    shutil.copytree(whole / "model" / "checkpoint-3", in_diffusion / "model" / "checkpoint-3")
    for stopped in (in_autoencoder, in_diffusion):
        assert main(["train-ehr", "--output-dir", str(stopped), *arguments, "--resume-from-checkpoint", "latest"]) == 0
        for part in ("denoiser", "autoencoder"):
            _same_weights(whole / "model" / part, stopped / "model" / part)


@pytest.fixture(scope="module")
def cxr_world(tmp_path_factory) -> dict[str, Path]:
    """A 20-subject triplet dataset with MiniLM event embeddings, and two different tiny 64 px VAEs."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("scale-out-cxr")
    world = {"data": prepare_demo_cxr(root, 20)}
    for seed, name in enumerate(("vae", "other_vae")):
        torch.manual_seed(seed)
        AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, sample_size=64).save_pretrained(root / name)
        world[name] = root / name
    return world


@pytest.mark.slow
def test_train_cxr_on_two_cpu_processes_resumes_bit_identically(cxr_world, tmp_path, two_processes) -> None:
    """135 train triplets, 32 per process: 3 steps an epoch, so checkpoint-2 falls mid-epoch."""
    arguments = ["--dataset", str(cxr_world["data"]), "--vae", str(cxr_world["vae"]), "--diffusion-steps", "4",
                 "--checkpointing-steps", "2", "--num-processes", "2", "-q"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["train-cxr", "--output-dir", str(whole), *arguments]) == 0
    _assert_only_checkpoint_folders(_rank_writes(two_processes, tmp_path))
    shutil.copytree(whole / "model" / "checkpoint-2", stopped / "model" / "checkpoint-2")
    assert main(["train-cxr", "--output-dir", str(stopped), *arguments, "--resume"]) == 0
    for part in ("unet", "fusion_adapter", "event_encoder"):
        _same_weights(whole / "model" / part, stopped / "model" / part)


# ---------------------------------------------------------------------------------------------- latent cache
def _latents(dataset: Path) -> dict[str, np.ndarray]:
    from datasets import load_from_disk

    splits = load_from_disk(str(dataset))
    return {f"{split}/{column}": np.asarray(splits[split].with_format("numpy")[column])
            for split in splits for column in ("previous_latent", "target_latent")}


@pytest.mark.slow
def test_latents_cached_by_two_processes_equal_one_process_and_train_cxr_uses_them(cxr_world, tmp_path, capsys,
                                                                                    two_processes) -> None:
    """... and train-cxr reads them (its card says so), and refuses them with another VAE, naming both."""
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(cxr_world["data"], one)
    shutil.copytree(cxr_world["data"], two)
    for folder, processes in ((one, "1"), (two, "2")):
        assert main(["cache-latents", "--dataset", str(folder), "--vae", str(cxr_world["vae"]), "--shard-size", "40",
                     "--num-processes", processes, "-q"]) == 0
    first, second = _latents(one), _latents(two)
    assert first.keys() == second.keys() and all(np.array_equal(first[key], second[key]) for key in first)
    assert first["train/previous_latent"].shape[1:] == (4, 16, 16)
    features = json.loads((two / "train" / "dataset_info.json").read_text())["features"]
    assert features["previous_latent"] == {"shape": [4, 16, 16], "dtype": "float16", "_type": "Array3D"}
    shards = {(event, path) for event, path in _rank_writes(two_processes, tmp_path)
              if not Path(path).parts[1:2] == ("latent-cache",)}  # rank 1 saves its own shards
    assert not shards, f"rank 1 wrote {sorted(shards)[:10]}"
    record = json.loads((two / "cxr_summary.json").read_text())["latents"]
    assert record["vae"] == str(cxr_world["vae"]) and record["resolution"] == 64 and len(record["vae_sha256"]) == 64
    assert not (two / "latent-cache").exists()  # the shards are gone once the columns are written

    from diffusers import AutoencoderKL

    from ehr_diffusers.data.cxr.split import load_cxr_split
    from ehr_diffusers.training.train_ehrxdiff import encode_split

    vae = AutoencoderKL.from_pretrained(cxr_world["vae"]).eval()
    split = load_cxr_split(one, "train", 64, show_progress=False)
    previous, target = encode_split(vae, split, 64, torch.device("cpu"), False)
    assert np.array_equal(previous.half().numpy(), first["train/previous_latent"])  # what training would compute
    assert np.array_equal(target.half().numpy(), first["train/target_latent"])

    assert main(["train-cxr", "--dataset", str(two), "--output-dir", str(tmp_path / "run"), "--vae",
                 str(cxr_world["vae"]), "--diffusion-steps", "2", "-q"]) == 0
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert f"read from the dataset (cache-latents, VAE sha256 {record['vae_sha256'][:12]})" in card
    capsys.readouterr()
    assert main(["train-cxr", "--dataset", str(two), "--output-dir", str(tmp_path / "other"), "--vae",
                 str(cxr_world["other_vae"]), "--diffusion-steps", "2", "-q"]) == 2
    error = capsys.readouterr().err
    assert f"cached with the VAE {cxr_world['vae']}" in error and f"not --vae_path {cxr_world['other_vae']}" in error


def test_a_latent_cache_of_another_vae_is_refused(cxr_world, tmp_path, capsys) -> None:
    """train-cxr without --vae (it would train a VAE of its own) is refused before launch; the rule that refuses
    another VAE or resolution names both."""
    from ehr_diffusers.data.cxr.latents import check_cache_matches

    data = tmp_path / "data"
    shutil.copytree(cxr_world["data"], data)
    summary = json.loads((data / "cxr_summary.json").read_text())
    summary["latents"] = {"vae": "vaes/cheff", "vae_sha256": "a" * 64, "resolution": 64}
    (data / "cxr_summary.json").write_text(json.dumps(summary))
    assert main(["train-cxr", "--dataset", str(data), "--output-dir", str(tmp_path / "run")]) == 2
    assert "latents cached with the VAE vaes/cheff" in capsys.readouterr().err
    with pytest.raises(DataError, match="cached with the VAE vaes/cheff .*not --vae_path my-vae"):
        check_cache_matches(data, summary["latents"], "my-vae", "b" * 64, 64, "--vae_path")
    with pytest.raises(DataError, match="are of 64 px images, this run's are 32 px"):
        check_cache_matches(data, summary["latents"], "vaes/cheff", "a" * 64, 32, "--vae_path")


def test_latent_caching_resumes_by_shard(cxr_world, tmp_path, monkeypatch, fresh_accelerate_state) -> None:
    """Stopped after its second shard, the cache run encodes only the rest when run again, and ends with the latents
    of a run never stopped."""
    from ehr_diffusers.training import cache_cxr_latents

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    shutil.copytree(cxr_world["data"], whole)
    shutil.copytree(cxr_world["data"], stopped)
    arguments = ["--vae_path", str(cxr_world["vae"]), "--shard_size", "30"]
    cache_cxr_latents.main(["--train_data_dir", str(whole), *arguments])
    encode, encoded = cache_cxr_latents.encode_shard, []

    def stop_after_two(vae, data_dir, shard, *rest):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(shard.name)
        return encode(vae, data_dir, shard, *rest)

    monkeypatch.setattr(cache_cxr_latents, "encode_shard", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        cache_cxr_latents.main(["--train_data_dir", str(stopped), *arguments])
    assert "previous_latent" not in json.loads((stopped / "train" / "dataset_info.json").read_text())["features"]
    first_two = list(encoded)
    encoded.clear()
    monkeypatch.setattr(cache_cxr_latents, "encode_shard", lambda *args: encoded.append(args[2].name)
                        or encode(*args))
    reset_accelerate_state()
    result = cache_cxr_latents.main(["--train_data_dir", str(stopped), *arguments])
    assert not set(first_two) & set(encoded) and len(first_two) + len(encoded) == result["shards"]
    expected, actual = _latents(whole), _latents(stopped)
    assert all(np.array_equal(expected[key], actual[key]) for key in expected)
