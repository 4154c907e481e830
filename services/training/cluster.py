"""The layout of a distributed run and how it is launched, checked and watched from the trainer.

A start request's ``distributed`` becomes a :class:`Layout` (validated here: a 400 naming the
field), recorded in the run's ``training_config.json`` so that resume and the dashboard know it.
The run is started with ``mlx.launch`` (local ranks directly, remote hosts over ssh, as it does);
every rank is our own worker. Before launching, every remote host is asked over ssh whether it
has the same Python, the workspace path and MLX, so a wrong host is an error naming it, not a
hang. While the run goes, the launcher's output says which rank ended how; :func:`rank_failure`
turns that into the run's ``training_error``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forgellm.config import is_loopback
from forgellm.schemas import DistributedSpec, ErrorCode, TrainingStartRequest
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.workspace import Workspace
from forgellm.services.training.distributed import EXIT_HUNG, EXIT_MARKER, EXIT_PEER_LOST

# mlx.launch starts a rank without ssh only for this exact host.
LOCAL_HOST = "127.0.0.1"
SSH_FAILED = 255  # ssh's own exit status: connection failed, or the remote end died by a signal


@dataclass
class Layout:
    backend: str  # ring | nccl | mpi (auto resolved)
    rank_hosts: list[str]  # the host of each rank, rank 0 first (ssh names)
    processes: int  # ranks per host
    launcher: list[str]  # the launcher's command, resolved
    hostfile: str | None = None  # an mlx.launch hostfile (absolute), instead of rank_hosts
    port: int = 0  # ring: the first port; nccl: the rendezvous port
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.world_size = len(self.rank_hosts)

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys(self.rank_hosts))

    @property
    def remote_hosts(self) -> list[str]:
        return [h for h in self.hosts if h != LOCAL_HOST]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hosts": self.hosts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        launcher = data["launcher"]
        return cls(backend=data["backend"], rank_hosts=list(data["rank_hosts"]), processes=data["processes"],
                   launcher=[launcher] if isinstance(launcher, str) else list(launcher),
                   hostfile=data.get("hostfile"), port=int(data.get("port", 0)))


def bad(field_name: str, message: str, suggestion: str = "", **details: Any) -> ForgeError:
    return ForgeError(ErrorCode.INVALID_REQUEST, message, details={"field": field_name, **details},
                      suggestion=suggestion)


# --- resolving a request's ``distributed`` ---------------------------------------------------


def resolve_layout(ws: Workspace, request: TrainingStartRequest, settings: Any) -> Layout | None:
    """The run's layout, or None for a single process (``distributed`` absent or a world of 1)."""
    spec: DistributedSpec | None = request.distributed
    if spec is None:
        return None
    backend = spec.backend or settings.training.backend
    if backend == "auto":
        backend = "nccl" if cuda_available() else "ring"
    if spec.hostfile:
        if spec.processes != 1:
            raise bad("distributed.processes", "A hostfile lists every rank: leave 'processes' out with it")
        path = ws.resolve(spec.hostfile, field="distributed.hostfile")
        rank_hosts, ips, file_backend = read_hostfile(path)
        if file_backend and not spec.backend:
            backend = file_backend
        if backend == "ring" and not all(ips):
            raise bad("distributed.hostfile", "The ring backend needs 'ips' for every host of the hostfile")
        hostfile: str | None = str(path)
    else:
        hosts = list(spec.hosts) or list(settings.training.hosts) or [LOCAL_HOST]
        if len(set(hosts)) != len(hosts):
            raise bad("distributed.hosts", "A host is listed twice: use 'processes' for several ranks on a host",
                      hosts=hosts)
        for i, host in enumerate(hosts):
            if backend == "ring" and not is_ip(host):
                raise bad(f"distributed.hosts[{i}]", f"The ring backend needs IP addresses: {host!r} is a name",
                          "Give the host's address (e.g. its Thunderbolt-bridge or Ethernet IP), or a hostfile "
                          "with an ssh name and ips per host.", host=host)
        rank_hosts = [h for h in hosts for _ in range(spec.processes)]
        ips = [[h] if is_ip(h) else [] for h in rank_hosts]
        hostfile = None
    if backend not in ("ring", "nccl", "mpi"):
        raise bad("distributed.backend", f"Unknown backend {backend!r}: use ring, nccl, mpi or auto")
    world = len(rank_hosts)
    if world == 1:
        return None
    if request.batch_size % world:
        raise bad("batch_size", f"batch_size {request.batch_size} does not divide by the world size {world}: "
                  "every rank takes an equal share of each batch",
                  f"Use a multiple of {world} (e.g. {world * max(1, round(request.batch_size / world))}) or "
                  "fewer ranks.", batch_size=request.batch_size, world_size=world)
    first = rank_hosts[0]
    if not is_this_machine(first, ips[0]):
        raise bad("distributed.hosts[0]", f"The first host ({first}) must be this machine: rank 0 writes the run "
                  "into this workspace and reports to this platform", "List this machine's address first.",
                  host=first)
    if backend == "nccl" and not cuda_available():
        raise bad("distributed.backend", "The nccl backend needs MLX with CUDA (pip install 'mlx[cuda]')",
                  "Use backend 'ring' (or 'auto') on this machine.")
    if backend == "mpi" and shutil.which("mpirun") is None:
        raise bad("distributed.backend", "The mpi backend needs mpirun on PATH (OpenMPI)",
                  "Install OpenMPI or use backend 'ring'.")
    layout = Layout(backend, rank_hosts, spec.processes, find_launcher(settings.training.launcher), hostfile)
    layout.port = free_port_run(world) if backend == "ring" else free_port_run(1)
    return layout


def read_hostfile(path: Path) -> tuple[list[str], list[list[str]], str]:
    """(ssh name of each rank, its ips, the file's backend) from an ``mlx.launch`` hostfile:
    a list of ``{"ssh": ..., "ips": [...]}``, or ``{"backend": ..., "hosts": [...]}``."""
    try:
        data = json.loads(path.read_text())
        entries = data["hosts"] if isinstance(data, dict) else data
        backend = data.get("backend", "") if isinstance(data, dict) else ""
        hosts = [str(e["ssh"]) for e in entries]
        ips = [[str(ip) for ip in e.get("ips", [])] for e in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise bad("distributed.hostfile", f"The hostfile cannot be read as mlx.launch's format: {exc}",
                  'Write a JSON list such as [{"ssh": "mac1", "ips": ["10.0.0.1"]}, ...].') from None
    if not hosts:
        raise bad("distributed.hostfile", "The hostfile lists no hosts")
    return hosts, ips, backend


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def is_this_machine(host: str, ips: list[str]) -> bool:
    """Loopback, or an address this machine can bind (it is one of its interfaces)."""
    for candidate in [host, *ips]:
        if is_loopback(candidate):
            return True
        try:
            address = socket.gethostbyname(candidate)
        except OSError:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((address, 0))
            return True
        except OSError:
            continue
    return False


def cuda_available() -> bool:
    try:
        import mlx.core as mx

        return bool(mx.cuda.is_available())
    except (ImportError, AttributeError):
        return False


def find_launcher(name: str) -> list[str]:
    """``training.launcher``: ``mlx.launch`` is MLX's launcher run through ours (the same, minus
    its busy loop: services/training/launcher.py); another name is looked up beside this Python
    (a venv's bin), then on PATH, or taken as a path."""
    from forgellm.services.training import launcher

    if name == "mlx.launch" and launcher.available():
        return [sys.executable, "-m", "forgellm.services.training.launcher"]
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)
    if not found:
        raise bad("training.launcher", f"The launcher {name!r} was not found beside {sys.executable} or on PATH",
                  "Install MLX in ForgeLLM's environment (it ships mlx.launch) or set training.launcher to its "
                  "path.", launcher=name)
    return [found]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports free on this machine's loopback."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind((LOCAL_HOST, port))
            return base
        except OSError:
            continue
    raise ForgeError(ErrorCode.INTERNAL, "No free ports for the ranks' connections")


# --- checking remote hosts before launching ---------------------------------------------------


def preflight(layout: Layout, workspace: Path, timeout_s: float) -> None:
    """Ask every remote host over ssh whether it has this Python, the workspace at the same path
    and MLX with ForgeLLM: a host that fails is a 400 naming it and what to check."""
    hosts = layout.remote_hosts
    if not hosts:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        problems = [p for p in pool.map(lambda h: check_host(h, workspace, timeout_s), hosts) if p]
    if problems:
        host, message, suggestion = problems[0]
        raise bad("distributed.hosts", message, suggestion, host=host,
                  unreachable=[p[0] for p in problems])


def check_host(host: str, workspace: Path, timeout_s: float) -> tuple[str, str, str] | None:
    python, home = shlex.quote(sys.executable), shlex.quote(str(workspace))
    script = (f"test -x {python} || {{ echo forgellm-check:no-python; exit 3; }}; "
              f"test -d {home} || {{ echo forgellm-check:no-workspace; exit 4; }}; "
              f"{python} -c 'import mlx.core, forgellm.services.training.worker' 2>&1 || "
              "{ echo forgellm-check:no-import; exit 5; }; echo forgellm-check:ok")
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout_s))}", host, script]
    ssh_help = (f"Check that 'ssh {host}' works from this machine without a password (ssh-copy-id {host}), "
                "that the name or address is right and that the host is on.")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 5,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return host, "ssh is not installed on this machine: remote hosts are started over ssh", ssh_help
    except subprocess.TimeoutExpired:
        return host, f"Host {host} did not answer over ssh within {timeout_s:g} s", (
            ssh_help + " A firewall may drop the connection.")
    out = done.stdout
    if "forgellm-check:ok" in out:
        return None
    if "forgellm-check:no-python" in out:
        return host, f"Host {host} has no Python at {sys.executable}", (
            "Install ForgeLLM at the same path on every host (the same virtual environment path).")
    if "forgellm-check:no-workspace" in out:
        return host, f"Host {host} has no workspace at {workspace}", (
            "Use the same workspace path on every host: a shared folder (NFS/SMB) is simplest; the models and "
            "datasets a run reads must be there.")
    if "forgellm-check:no-import" in out:
        detail = out.replace("forgellm-check:no-import", "").strip().splitlines()[-1:] or [""]
        return host, f"Host {host} cannot import MLX and ForgeLLM with {sys.executable}: {detail[0]}", (
            "Install the same ForgeLLM (with MLX) in the same environment path there.")
    said = (done.stderr.strip() or out.strip() or f"exit code {done.returncode}").splitlines()[-1]
    return host, f"Cannot reach host {host} over ssh: {said}", ssh_help


# --- launching ----------------------------------------------------------------------------------


def launcher_argv(layout: Layout, run_dir: Path, resume_from: str | None, launch_id: str,
                  env: dict[str, str]) -> list[str]:
    """``mlx.launch`` starting one worker per rank. Local ranks inherit ``env``; the FORGELLM_
    and allocator settings in it also travel to remote ranks with ``--env``."""
    argv = [*layout.launcher, "--backend", layout.backend]
    if layout.hostfile:
        argv += ["--hostfile", layout.hostfile]
    else:
        argv += ["--hosts", ",".join(layout.hosts), "-n", str(layout.processes)]
    if layout.backend == "ring":
        argv += ["--starting-port", str(layout.port)]
    elif layout.backend == "nccl":
        argv += ["--nccl-port", str(layout.port)]
    argv += ["--python", sys.executable]
    passed = {k: v for k, v in env.items() if k.startswith(("FORGELLM_", "MALLOC_", "PYTHONUNBUFFERED"))}
    passed["FORGELLM_LAUNCH_ID"] = launch_id
    if layout.processes > 1 and "OPENBLAS_NUM_THREADS" not in env:
        # Ranks sharing a host share its cores: BLAS threads beyond its share only contend
        # (measured on 2 cores, SmolLM2 LoRA, 2 ranks: 52 tokens/s with 2 threads each, 85-102
        # with 1). Matters on CPU only; Metal and CUDA do not use BLAS threads for the model.
        passed["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // layout.processes))
    for key, value in sorted(passed.items()):
        argv += ["--env", f"{key}={value}"]
    argv += ["--", "-m", "forgellm.services.training.worker", str(run_dir)]
    if resume_from:
        argv.append(resume_from)
    return argv


def rank_zero_pid(run_dir: Path, launch_id: str) -> int | None:
    """Rank 0's pid as it registered for this launch, or None before it has."""
    try:
        entry = json.loads((run_dir / "ranks" / "0.json").read_text())
    except (OSError, ValueError):
        return None
    return int(entry["pid"]) if entry.get("launch_id") == launch_id else None


# --- reading the launcher's output --------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE_EXIT = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")
_NODE_KILLED = re.compile(r"Node with rank (\d+) was killed")


@dataclass
class RankExit:
    rank: int
    code: int | None = None  # the exit status mlx.launch saw (negative: a signal)
    kind: str = ""  # what the rank said of itself: peer_lost, hang, error
    error: str = ""
    host: str = ""


def parse_launcher_line(line: str) -> RankExit | None:
    """A rank's end from one line of mlx.launch's output: its own marker, or the launcher's
    "Node with rank N exited with code C" (C = -9 for SIGKILL)."""
    text = _ANSI.sub("", line).strip()
    if text.startswith(EXIT_MARKER):
        try:
            said = json.loads(text[len(EXIT_MARKER):])
            return RankExit(int(said["rank"]), kind=str(said.get("kind", "")), error=str(said.get("error", "")),
                            host=str(said.get("host", "")))
        except (ValueError, KeyError, TypeError):
            return None
    if match := _NODE_EXIT.search(text):
        return RankExit(int(match[1]), code=int(match[2]))
    if match := _NODE_KILLED.search(text):
        return RankExit(int(match[1]), code=-int(signal.SIGTERM))
    return None


def merge_exit(exits: dict[int, RankExit], seen: RankExit) -> RankExit:
    known = exits.setdefault(seen.rank, RankExit(seen.rank))
    known.code = seen.code if seen.code is not None else known.code
    known.kind = seen.kind or known.kind
    known.error = seen.error or known.error
    known.host = seen.host or known.host
    return known


def is_failure(exit_: RankExit) -> bool:
    return bool(exit_.kind) or (exit_.code is not None and exit_.code != 0)


def signal_name(code: int) -> str:
    """SIGKILL for an exit status of -9."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass
class Failure:
    error: str
    suggestion: str
    resumable: bool  # a fault of the layout (a rank killed, hung, a peer lost), not of the run


def rank_failure(order: list[int], exits: dict[int, RankExit], layout: Layout) -> Failure | None:
    """The run's error from how its ranks ended, naming the first rank that failed by itself (a
    survivor that only lost its peer is not the cause)."""
    failed = [exits[r] for r in order if r in exits and is_failure(exits[r])]
    if not failed:
        return None
    causes = [e for e in failed if e.kind != "peer_lost" and e.code != EXIT_PEER_LOST]
    # Ranks that said nothing while others lost them: a remote rank whose launcher thread never
    # reported (the run was cleaned up first) is the likely one that died.
    silent = [r for r in range(layout.world_size) if r not in exits]
    if not causes and silent:
        rank = silent[0]
        host = layout.rank_hosts[rank] if rank < len(layout.rank_hosts) else "?"
        lost_by = ", ".join(str(e.rank) for e in failed)
        return Failure(f"Training rank {rank} of {layout.world_size} on {host} vanished: rank {lost_by} lost its "
                       "connection to it and it reported nothing (killed, out of memory, or its host or network "
                       "went away)", f"Check that {host} is up and reachable; the whole layout resumes from the "
                       "last checkpoint.", True)
    first = (causes or failed)[0]
    host = first.host or (layout.rank_hosts[first.rank] if first.rank < len(layout.rank_hosts) else "?")
    where = f"rank {first.rank} of {layout.world_size} on {host}"
    if first.kind == "hang" or first.code == EXIT_HUNG:
        return Failure(f"Training {where} hung: {first.error or 'no progress'}",
                       "The run resumes from its last checkpoint. If it recurs, check the network between the "
                       "hosts, or use fewer ranks (the ring backend can deadlock with 3 or more, mlx #4475).", True)
    if first.kind == "peer_lost" or first.code == EXIT_PEER_LOST:
        return Failure(f"Training {where} lost its connection to another rank: {first.error}",
                       "Check the network between the hosts and that the ring ports are open in the firewall; "
                       "the run resumes from its last checkpoint.", True)
    if first.code == SSH_FAILED and host != LOCAL_HOST and not first.kind:
        # A rank started over ssh: its own end is hidden behind ssh's status, 255 both when the
        # remote process was killed by a signal and when the connection or the host went away.
        return Failure(f"Training {where} ended abnormally (its ssh session exited with 255: the rank was "
                       "killed, ran out of memory, or the host or the network went away)",
                       f"Check that {host} is up and reachable; the whole layout resumes from the last "
                       "checkpoint.", True)
    if first.code is not None and first.code < 0:
        name = signal_name(first.code)
        why = ("probably out of memory on that host: reduce batch_size or max_seq_length, or enable "
               "grad_checkpoint" if first.code == -signal.SIGKILL else "it was signalled from outside")
        return Failure(f"Training {where} was killed ({name})", f"{why[0].upper()}{why[1:]}. The whole layout "
                       "resumes from the last checkpoint.", True)
    detail = f": {first.error}" if first.error else f" with code {first.code}"
    return Failure(f"Training {where} failed{detail}",
                   "See the trainer log (every rank's output is in it); resume from the last checkpoint with "
                   "resume_from.", False)
