"""Start and stop a private Ray head for tests: 127.0.0.1 only, token auth, own ports,
own --temp-dir and own token file.

127.0.0.1 only: on Linux `ray start --node-ip-address 127.0.0.1` alone still registers the node
under the machine's outward address and binds GCS and raylet to all interfaces (Ray turns a
loopback node address into a "remotely reachable" one). `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`
(Ray's single-machine mode) keeps the node at 127.0.0.1, and with it every gRPC server, the
agents and the metrics endpoint; the dashboard is bound with --dashboard-host 127.0.0.1.
`listening_sockets(pids)` lists what the head's processes listen on (tests assert loopback only).

`ray stop` stops every Ray on the machine (other sessions' included), so the head is run as
`ray start --head --block` in its own process group and stopped through that process only:
SIGTERM to it makes Ray kill the processes it started; anything still alive afterwards whose
command line mentions our temp dir, or whose working directory lies inside it (job drivers
run from the unpacked working_dir there), is killed by pid. Nothing else is touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from musiclm.net import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def ray_exe() -> str:
    exe = VENV_BIN / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


# Ray's single-machine mode: a loopback --node-ip-address stays loopback (see the module docstring)
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def token_env(token_path: str | Path) -> dict:
    """Environment a client (driver, `ray job submit`) needs to talk to the head."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def write_token(path: str | Path) -> str:
    """A fresh 256-bit token (same format as `ray get-auth-token --generate`, which always
    writes ~/.ray/auth_token: we keep tests out of the home directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    path.write_text(token)
    os.chmod(path, 0o600)
    return token


@dataclass
class RayHead:
    temp_dir: str
    token_path: str
    gcs_port: int
    dashboard_port: int
    num_cpus: int
    proc: subprocess.Popen | None = None
    log_path: str = ""
    extra_env: dict = field(default_factory=dict)
    agent_port: int = field(default_factory=free_port)  # dashboard agent (HTTP)
    metrics_port: int = field(default_factory=free_port)  # Prometheus metrics export

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, *, for_jobs_api: bool = False) -> dict:
        """os.environ plus what a client of this head needs. `for_jobs_api` points RAY_ADDRESS
        at the dashboard (ray job submit), else at the GCS (a driver calling ray.init())."""
        env = dict(os.environ)
        env.update(token_env(self.token_path))
        env["RAY_ADDRESS"] = self.dashboard_url if for_jobs_api else self.gcs_address
        env.update(LOCAL_ONLY_ENV)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90.0) -> RayHead:
        env = dict(os.environ)
        env.update(token_env(self.token_path))
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop() tears down at once (no 30 s drain)
        env.update(LOCAL_ONLY_ENV)  # node address stays 127.0.0.1: nothing listens on other interfaces
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # job entrypoints' `python`
        env.pop("RAY_ADDRESS", None)
        env.update(self.extra_env)
        self.log_path = os.path.join(self.temp_dir, "head.log")
        log = open(self.log_path, "wb")
        cmd = [
            ray_exe(),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--temp-dir",
            self.temp_dir,
            # ports that otherwise default to fixed numbers (10001, 52365) shared by every head
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(self.agent_port),
            "--metrics-export-port",
            str(self.metrics_port),
            "--num-cpus",
            str(self.num_cpus),
            "--num-gpus",
            "0",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.temp_dir,
        )
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited ({self.proc.returncode}):\n{self.log()}")
            if self._dashboard_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ray head not ready after {timeout}s:\n{self.log()}")

    def _dashboard_ready(self) -> bool:
        # /api/version answers once the job API is up (with token auth it wants the bearer token).
        token = Path(self.token_path).read_text().strip()
        req = urllib.request.Request(self.dashboard_url + "/api/version", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def own_pids(self) -> list[int]:
        """Processes belonging to this head: command line mentions our temp dir, or cwd is in it."""
        me = os.getpid()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
            mentions = any(self.temp_dir + end in cmdline + " " for end in ("/", " ", "=", ":"))
            if mentions or cwd == self.temp_dir or cwd.startswith(self.temp_dir + "/"):
                pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block: kill what it started
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:  # its own process group (start_new_session), never ours
                if os.getpgid(self.proc.pid) == self.proc.pid:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + 10
        while True:
            pids = self.own_pids()
            if not pids or time.time() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.3)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def listening_sockets(pids) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every listening TCP socket (IPv4 and IPv6) that one of
    ``pids`` holds, read from /proc (no `ss` needed). IPv4-mapped IPv6 addresses are given as
    IPv4 (``::ffff:127.0.0.1`` -> ``127.0.0.1``)."""
    import ipaddress

    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if sys.byteorder == "little":  # /proc prints each 32-bit word in host byte order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            out.append((inodes[f[9]], str(ip), int(hexport, 16)))
    return sorted(out)


def start_head(num_cpus: int = 2, base_dir: str | None = None, extra_env: dict | None = None) -> RayHead:
    """Start a private head. Unix socket paths must stay short, so the temp dir goes under /tmp."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir=base_dir or "/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    write_token(token_path)
    head = RayHead(
        temp_dir=temp_dir,
        token_path=token_path,
        gcs_port=free_port(),
        dashboard_port=free_port(),
        num_cpus=num_cpus,
        extra_env=dict(extra_env or {}),
    )
    return head.start()


def job_submit(
    head: RayHead,
    args: list[str],
    *,
    cwd: str | Path = REPO,
    timeout: float = 300,
    entrypoint_num_cpus: float | None = None,
    env_vars: dict | None = None,
) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python ...` against the head's dashboard; waits for the end.
    `env_vars` reach the job's driver and workers through the job's runtime_env."""
    import json

    cmd = [ray_exe(), "job", "submit", "--working-dir", "."]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": dict(env_vars)})]
    if entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(entrypoint_num_cpus)]
    cmd += ["--", "python", *args]
    return subprocess.run(
        cmd, cwd=str(cwd), env=head.env(for_jobs_api=True), capture_output=True, text=True, timeout=timeout
    )


def cleanup(head: RayHead | None) -> None:
    if head is None:
        return
    head.stop()
    shutil.rmtree(head.temp_dir, ignore_errors=True)
