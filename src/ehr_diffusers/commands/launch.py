"""How the commands start a script under ``accelerate launch``: one process, several on one machine (GPUs, or CPUs over
gloo), several machines, or whatever an accelerate config file (FSDP, DeepSpeed) asks for.

Processes are accelerate's to start: on GPUs ``--num_processes N`` is its multi-GPU launch; on CPUs the same launch
(torchrun underneath) with ``ACCELERATE_USE_CPU=true`` gives N ranks over gloo, whereas ``accelerate launch --cpu``
always starts one. ``--num-processes`` counts every process of every machine, as accelerate's does.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, EHRDiffusersError

# the line of every training script's start that gives the batch over all processes (diffusers' examples word it so)
EFFECTIVE_BATCH = "Total train batch size"
_SCRIPT_ERROR = re.compile(r"^[\w.-]+: error: ")  # training.common.run_script's line


class TrainingFailedError(EHRDiffusersError, RuntimeError):
    """A script run under ``accelerate launch`` exited with an error (which it has printed)."""


# accelerate config distributed types whose processes are not plain data parallelism, and need GPUs
GPU_ONLY_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


@dataclass(frozen=True)
class LaunchOptions:
    """The ``accelerate launch`` settings of a command. Those left as None take the accelerate config's values when
    ``config_file`` is given, else one process on one machine without mixed precision."""

    num_processes: int | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    config_file: Path | None = None
    mixed_precision: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LaunchOptions:
        return cls(args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip,
                   args.main_process_port, args.accelerate_config, getattr(args, "mixed_precision", None))

    @cached_property
    def config(self) -> dict[str, Any]:
        """The accelerate config file's values ({} without one), read once; accelerate writes YAML or JSON, both
        YAML."""
        if self.config_file is None:
            return {}
        import yaml

        try:
            values = yaml.safe_load(Path(self.config_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ArgumentError(f"--accelerate-config {self.config_file}: not a readable accelerate config "
                                f"({error})") from None
        if not isinstance(values, dict):
            raise ArgumentError(f"--accelerate-config {self.config_file}: not an accelerate config (no settings)")
        return values

    @property
    def processes(self) -> int:
        """Processes over all machines: the option, else the config's, else 1."""
        return self.num_processes or int(self.config.get("num_processes") or 1)

    @property
    def machines(self) -> int:
        return self.num_machines or int(self.config.get("num_machines") or 1)

    @property
    def several(self) -> bool:
        return self.processes > 1 or self.machines > 1


def check_launch(options: LaunchOptions, cuda_devices: int) -> None:
    """ArgumentErrors naming the option for settings accelerate would refuse late or obscurely: too many processes
    for this machine's GPUs, multi-node options without the others they need, GPU-only set-ups on CPUs."""
    if options.config_file is not None and not Path(options.config_file).is_file():
        raise ArgumentError(f"--accelerate-config {options.config_file}: no such file")
    config, machines, processes = options.config, options.machines, options.processes
    if machines == 1:
        given = [name for name, value in (("--machine-rank", options.machine_rank not in (None, 0)),
                                          ("--main-process-ip", options.main_process_ip is not None)) if value]
        if given:
            raise ArgumentError(f"{' and '.join(given)} only apply to several machines; add --num-machines M (M >= 2)"
                                " and the same options on every machine")
    else:
        rank = options.machine_rank if options.machine_rank is not None else config.get("machine_rank")
        missing = [name for name, value in (("--machine-rank", rank),
                                            ("--main-process-ip", options.main_process_ip or
                                             config.get("main_process_ip"))) if value is None]
        if missing:
            raise ArgumentError(f"--num-machines {machines} needs {' and '.join(missing)}: each machine runs the same "
                                "command with its own --machine-rank and the address of the machine of rank 0")
        if not 0 <= int(rank) < machines:
            raise ArgumentError(f"--machine-rank {rank}: must be 0 to {machines - 1} with --num-machines {machines}")
        if processes < machines or processes % machines:
            raise ArgumentError(f"--num-machines {machines} needs --num-processes, the processes of all machines "
                                f"together: a multiple of {machines}, got {options.num_processes or processes}")
    per_machine = processes // machines
    if cuda_devices and per_machine > cuda_devices:
        raise ArgumentError(f"--num-processes {processes}: {per_machine} process(es) per machine, but this machine "
                            f"has {cuda_devices} GPU(s); one process per GPU")
    if not cuda_devices:
        if (options.mixed_precision or config.get("mixed_precision")) == "fp16":
            raise ArgumentError("--mixed-precision fp16 needs a CUDA GPU; use bf16 (which CPUs run) or no")
        if str(config.get("distributed_type", "")).upper() in GPU_ONLY_TYPES:
            raise ArgumentError(f"--accelerate-config {options.config_file}: {config['distributed_type']} needs "
                                "GPUs, and this machine has none; on CPUs, processes are plain data parallelism")


def _cpu_count() -> int:
    """The cores this process may run on (a container's or a scheduler's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch_command(module: str, arguments: list[str], options: LaunchOptions, cuda_devices: int,
                   cpu_threads: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``python -m accelerate.commands.launch`` command line and the environment that run ``module``. Options
    that were given override the accelerate config; without a config the defaults are passed explicitly, so that
    an ``accelerate config`` default file cannot change them."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--dynamo_backend", "no"]
    environment = dict(os.environ)
    configured = options.config_file is not None
    if configured:
        launch += ["--config_file", str(options.config_file)]
    if options.num_processes is not None or not configured:
        launch += ["--num_processes", str(options.processes)]
    if options.mixed_precision is not None or not configured:
        launch += ["--mixed_precision", options.mixed_precision or "no"]
    if options.num_machines is not None or not configured:
        launch += ["--num_machines", str(options.machines)]
    if options.machine_rank is not None:
        launch += ["--machine_rank", str(options.machine_rank)]
    if options.main_process_ip is not None:
        launch += ["--main_process_ip", options.main_process_ip]
    port = options.main_process_port
    if port is None and not configured and options.several:  # 0: a free port, so that two runs do not meet
        port = 0 if options.machines == 1 else 29500
    if port is not None:
        launch += ["--main_process_port", str(port)]
    several = options.several
    if not cuda_devices:
        if cpu_threads is None and several and "OMP_NUM_THREADS" not in environment:  # torchrun would make it 1
            cpu_threads = max(1, _cpu_count() // (options.processes // options.machines))
        if cpu_threads is not None:
            launch += ["--num_cpu_threads_per_process", str(cpu_threads)]
            environment["OMP_NUM_THREADS"] = str(cpu_threads)  # torchrun's workers read it, not the flag
        if several or configured:
            environment["ACCELERATE_USE_CPU"] = "true"  # torchrun's ranks then meet over gloo
        # accelerate's torchrun launch (--multi_gpu) is the one that starts several processes; --cpu starts one
        launch.append("--multi_gpu" if several else "--cpu")
    elif several and str(options.config.get("distributed_type", "NO")).upper() in ("NO", "MULTI_CPU"):
        launch.append("--multi_gpu")  # a config of one process (or none): accelerate's simple launch would start one
    return [*launch, "-m", module, *arguments], environment


def accelerate_launch(module: str, arguments: list[str], options: LaunchOptions, quiet: bool = False,
                      cpu_threads: int | None = None) -> None:
    """Runs ``module`` under ``accelerate launch`` and waits for it; a failure becomes one error line (the script's
    own messages are above it). ``quiet`` keeps the script's output unless it fails. Ctrl-C and SIGTERM are passed
    on, and the run is waited for, so no process is left behind."""
    import signal
    import subprocess

    devices = cuda_device_count()
    command, environment = launch_command(module, arguments, options, devices, cpu_threads)
    if options.several or options.config_file is not None:
        where = f"{options.processes} process(es) on {'GPUs' if devices else 'CPUs over gloo'}"
        if options.config_file is not None:
            where += f", as {options.config_file} sets up"
        rank = options.machine_rank if options.machine_rank is not None else options.config.get("machine_rank")
        machines = f", machine {rank} of {options.machines}" if options.machines > 1 else ""
        print(f"{module.rsplit('.', 1)[-1]}: accelerate launch, {where}{machines}", file=sys.stderr, flush=True)
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if quiet else {}
    process = subprocess.Popen(command, env=environment, **output)
    try:
        stdout, _ = process.communicate()
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (cli.Terminated): stop the run as it would stop
        process.send_signal(signal.SIGTERM if type(interrupt) is not KeyboardInterrupt else signal.SIGINT)
        try:
            process.wait(timeout=60)  # accelerate launch passes the signal on and waits for the script
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    shown = _worth_showing(stdout.splitlines(), process.returncode != 0) if quiet else []
    if shown:
        print("\n".join(shown), file=sys.stderr)
    if process.returncode != 0:
        raise TrainingFailedError(f"{module.rsplit('.', 1)[-1]} failed (exit status {process.returncode}); see its "
                                  "messages above")


def _worth_showing(lines: list[str], failed: bool) -> list[str]:
    """What a quiet run shows: its warnings and its effective batch, and when it failed, the scripts' one-line errors
    (once, although every process prints its own) or, when there are none, the last 40 lines (a traceback)."""
    if not failed:
        return [line for line in lines if "WARNING" in line or EFFECTIVE_BATCH in line]
    errors = [line for line in lines if _SCRIPT_ERROR.match(line)]
    return list(dict.fromkeys(errors)) if errors else lines[-40:]


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
