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
from pathlib import Path

from ..errors import ArgumentError, EHRDiffusersError

# the line of every training script's start that gives the batch over all processes (diffusers' examples word it so)
EFFECTIVE_BATCH = "Total train batch size"
_SCRIPT_ERROR = re.compile(r"^[\w.-]+: error: ")  # training.common.run_script's line


class TrainingFailedError(EHRDiffusersError, RuntimeError):
    """A script run under ``accelerate launch`` exited with an error (which it has printed)."""


@dataclass(frozen=True)
class LaunchOptions:
    """The ``accelerate launch`` settings of a command. ``num_processes`` and ``mixed_precision`` left as None take
    the accelerate config's values when ``config_file`` is given, else 1 and "no"."""

    num_processes: int | None = None
    num_machines: int = 1
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    config_file: Path | None = None
    mixed_precision: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LaunchOptions:
        return cls(args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip,
                   args.main_process_port, args.accelerate_config, getattr(args, "mixed_precision", None))

    @property
    def processes(self) -> int:
        return self.num_processes or 1


def check_launch(options: LaunchOptions, cuda_devices: int) -> None:
    """ArgumentErrors naming the option for settings accelerate would refuse late or obscurely: too many processes
    for this machine's GPUs, and multi-node options without the others they need."""
    if options.config_file is not None and not Path(options.config_file).is_file():
        raise ArgumentError(f"--accelerate-config {options.config_file}: no such file")
    machines = options.num_machines
    node_options = {"--machine-rank": options.machine_rank, "--main-process-ip": options.main_process_ip}
    if machines == 1:
        given = [name for name, value in node_options.items() if value is not None]
        if given:
            raise ArgumentError(f"{' and '.join(given)} only apply to several machines; add --num-machines M (M >= 2)"
                                " and the same options on every machine")
    else:
        missing = [name for name, value in node_options.items() if value is None]
        if missing:
            raise ArgumentError(f"--num-machines {machines} needs {' and '.join(missing)}: each machine runs the same "
                                "command with its own --machine-rank and the address of the machine of rank 0")
        if not 0 <= options.machine_rank < machines:
            raise ArgumentError(f"--machine-rank {options.machine_rank}: must be 0 to {machines - 1} with "
                                f"--num-machines {machines}")
        if options.num_processes is None or options.num_processes % machines:
            raise ArgumentError(f"--num-processes {options.num_processes}: counts the processes of all machines and "
                                f"must be a multiple of --num-machines {machines}")
    per_machine = options.processes // machines
    if cuda_devices and per_machine > cuda_devices:
        raise ArgumentError(f"--num-processes {options.num_processes}: {per_machine} process(es) per machine, but "
                            f"this machine has {cuda_devices} GPU(s); one process per GPU")
    if options.mixed_precision == "fp16" and not cuda_devices:
        raise ArgumentError("--mixed-precision fp16 needs a CUDA GPU; use bf16 (which CPUs run) or no")


def launch_command(module: str, arguments: list[str], options: LaunchOptions, cuda_devices: int,
                   cpu_threads: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``python -m accelerate.commands.launch`` command line and the environment that run ``module``."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--dynamo_backend", "no"]
    environment = dict(os.environ)
    if options.config_file is not None:
        launch += ["--config_file", str(options.config_file)]
    if options.num_processes is not None or options.config_file is None:
        launch += ["--num_processes", str(options.processes)]
    if options.mixed_precision is not None or options.config_file is None:
        launch += ["--mixed_precision", options.mixed_precision or "no"]
    launch += ["--num_machines", str(options.num_machines)]
    if options.num_machines > 1:
        launch += ["--machine_rank", str(options.machine_rank), "--main_process_ip", options.main_process_ip,
                   "--main_process_port", str(options.main_process_port or 29500)]
    elif options.processes > 1:  # 0: a free port, so that two runs on one machine do not meet
        launch += ["--main_process_port", str(options.main_process_port or 0)]
    if not cuda_devices:
        several = options.processes > 1 or options.num_machines > 1
        if cpu_threads is None and several and "OMP_NUM_THREADS" not in environment:  # torchrun would make it 1
            cpu_threads = max(1, (os.cpu_count() or 1) // (options.processes // options.num_machines))
        if cpu_threads is not None:
            launch += ["--num_cpu_threads_per_process", str(cpu_threads)]
            environment["OMP_NUM_THREADS"] = str(cpu_threads)  # torchrun's workers read it, not the flag
        if several:
            environment["ACCELERATE_USE_CPU"] = "true"
            if options.config_file is None:
                launch.append("--multi_gpu")  # accelerate's torchrun launch; ACCELERATE_USE_CPU makes it gloo ranks
        elif options.config_file is None:
            launch.append("--cpu")
    elif options.processes > 1 and options.config_file is None:
        launch.append("--multi_gpu")
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
    if options.processes > 1 or options.config_file is not None:
        where = "per the accelerate config" if options.num_processes is None else \
            f"{options.processes} processes on {'GPUs' if devices else 'CPUs over gloo'}"
        machines = f", machine {options.machine_rank} of {options.num_machines}" if options.num_machines > 1 else ""
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
