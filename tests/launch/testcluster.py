"""A real two-node cluster on one machine, as root: each node a network + UTS + mount namespace.

Node i (1, 2) gets a network namespace `<prefix>n<i>` holding one end of a veth pair named `llm0` with
10.213.47.<i>/24 (nothing else is routed: the nodes reach each other and nothing outside), its own hostname
`llm-n<i>` (UTS namespace), and a mount namespace in which /etc/hosts names both nodes and
/etc/ssh/ssh_config points ssh at a key generated for this cluster. Each node runs sshd on its address.
One munged (its key and socket in the cluster's directory, shared by both nodes as a shared filesystem
would share them), slurmctld on node 1 and one slurmd per node make a Slurm cluster of the two (3 CPUs each,
so three 2-node jobs run at once); slurm.conf, munged and the Slurm clients come from tests/launch/slurm_cluster.py.

The filesystem is this machine's, so the run directory and the checkout are on a "shared filesystem" as
on a real cluster. Nothing under /etc is written; /run/sshd (sshd's privilege-separation directory) is
created if missing. `down()` kills every process in the namespaces and deletes them.

    cluster = TwoNodeCluster(Path("/tmp/c")).up()
    cluster.run(1, ["hostname"])            # -> llm-n1
    cluster.down()

scripts/testcluster does the same by hand (up / down / exec).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.launch import slurm_cluster
from tests.launch.slurm_cluster import SLURM_TOOLS, SlurmClient, munged_command, slurm_conf, slurm_env, wait_until
from tests.launch.slurm_cluster import tool as _tool

SUBNET = "10.213.47"
IFNAME = "llm0"
TOOLS = ("ip", "unshare", "nsenter", "sshd", "ssh", "ssh-keygen", "pdsh", *SLURM_TOOLS)


def missing_tools() -> list[str]:
    return slurm_cluster.missing_tools(TOOLS)


def cannot_create_namespaces() -> str | None:
    """Why this process cannot build the cluster (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"llmprobe{uuid.uuid4().hex[:6]}"
    out = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` failed: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


SSHD_CONFIG = """\
ListenAddress {addr}
Port 22
HostKey {root}/ssh/host_n{i}
PidFile {root}/ssh/sshd_n{i}.pid
AuthorizedKeysFile {root}/ssh/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
"""

SSH_CONFIG = """\
Host *
    IdentityFile {root}/ssh/id_ed25519
    UserKnownHostsFile /dev/null
    StrictHostKeyChecking no
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 10
"""


# The node's init: a new UTS and mount namespace inside the network namespace; it names the node, binds
# the node's /etc/hosts and ssh client config, then sleeps so other commands can join its namespaces.
NODE_INIT = """\
set -e
hostname "$1"
mount --bind "$2" /etc/hosts
mount --bind "$3" /etc/ssh/ssh_config
mount --bind "$4" /etc/resolv.conf
echo ready
exec sleep infinity
"""


class TwoNodeCluster(SlurmClient):
    """`up()` builds it, `down()` removes everything (also after a partial `up`); a context manager does both."""

    def __init__(self, root: Path, prefix: str | None = None):
        self.root = Path(root).resolve()
        self.prefix = prefix or f"l{uuid.uuid4().hex[:5]}"
        self.hosts = {1: "llm-n1", 2: "llm-n2"}
        self.addrs = {1: f"{SUBNET}.1", 2: f"{SUBNET}.2"}
        self.init_pids: dict[int, int] = {}
        self.daemons: dict[str, int] = {}  # name -> pid (process group leader)
        self.slurm_dir = self.root / "slurm"
        self.env = slurm_env(self.slurm_dir / "slurm.conf")

    def netns(self, node: int) -> str:
        return f"{self.prefix}n{node}"

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> TwoNodeCluster:
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _up(self, timeout: float) -> None:
        for sub in ("ssh", "slurm", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._save()
        self._network()
        self._keys()
        for node in (1, 2):
            self.start_node(node, timeout)
        self._munge(timeout)
        self._slurm(timeout)
        self._save()

    def _network(self) -> None:
        a, b = f"{self.prefix}a", f"{self.prefix}b"
        for node in (1, 2):
            _sh("ip", "netns", "add", self.netns(node))
            self._save()
        _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for node, end in ((1, a), (2, b)):
            ns = self.netns(node)
            _sh("ip", "link", "set", end, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", end, "name", IFNAME)
            _sh("ip", "-n", ns, "addr", "add", f"{self.addrs[node]}/24", "dev", IFNAME)
            _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addrs[n]} {self.hosts[n]}\n" for n in (1, 2))
        (self.root / "hosts").write_text(hosts)
        # no name server: names resolve from the hosts file above, and no query leaves the nodes
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _keys(self) -> None:
        ssh = self.root / "ssh"
        os.chmod(ssh, 0o700)
        key = ssh / "id_ed25519"
        if not key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llm-testcluster", "-f", str(key))
        shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
        (ssh / "ssh_config").write_text(SSH_CONFIG.format(root=self.root))
        for node in (1, 2):
            host_key = ssh / f"host_n{node}"
            if not host_key.exists():
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
            (ssh / f"sshd_n{node}.conf").write_text(SSHD_CONFIG.format(addr=self.addrs[node], root=self.root, i=node))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def start_node(self, node: int, timeout: float = 60.0) -> None:
        """The node's namespaces (its init process) and its sshd; again after `kill_node` to bring it back."""
        init = subprocess.Popen(
            [
                _tool("nsenter"),
                f"--net=/run/netns/{self.netns(node)}",
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                NODE_INIT,
                "node-init",
                self.hosts[node],
                str(self.root / "hosts"),
                str(self.root / "ssh" / "ssh_config"),
                str(self.root / "resolv.conf"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        line = init.stdout.readline().strip()
        if line != "ready":
            init.kill()
            raise RuntimeError(f"node {node} did not start: {line} {init.stdout.read()}")
        self.init_pids[node] = init.pid  # unshare exec'd sh, which exec'd sleep: the same pid
        self._save()
        self.spawn(
            node, f"sshd-n{node}", [_tool("sshd"), "-D", "-e", "-f", str(self.root / "ssh" / f"sshd_n{node}.conf")]
        )
        other = 2 if node == 1 else 1
        self._wait(
            lambda: (
                self.run(
                    other if other in self.init_pids else node,
                    ["ssh", self.hosts[node], "true"],
                    check=False,
                    timeout=15,
                ).returncode
                == 0
            ),
            timeout,
            f"sshd on {self.hosts[node]}",
        )

    def _munge(self, timeout: float) -> None:
        """One munged for both nodes (its key and socket on the "shared filesystem"), on node 1."""
        self.spawn(1, "munged", munged_command(self.root / "munge"))
        self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), timeout, "munged socket")

    def _slurm(self, timeout: float) -> None:
        nodes = {self.hosts[n]: self.addrs[n] for n in (1, 2)}
        # fixed ports on the nodes' own addresses: nothing else listens there
        slurm_conf(self.slurm_dir, nodes, 3, self.root / "munge" / "munge.socket", 6817, 6818, "llmtwo", "two")
        self.spawn(1, "slurmctld", [_tool("slurmctld"), "-D", "-i"])
        self._wait(lambda: "UP" in self.scontrol("ping").stdout, timeout, "slurmctld")
        for node in (1, 2):
            self.start_slurmd(node)
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 60.0, nodes=(1, 2)) -> None:
        """Until slurmctld counts the nodes' slurmd as IDLE (after `up`, or once a killed node is back)."""
        self._wait(lambda: all(self.node_state(self.hosts[n]) == "IDLE" for n in nodes), timeout, "slurmd idle")

    def start_slurmd(self, node: int) -> None:
        self.spawn(node, f"slurmd-n{node}", [_tool("slurmd"), "-D", "-N", self.hosts[node]])

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL every process of the node (its init, sshd, slurmd and whatever runs there), as a node
        that loses power. The network namespace stays (a dead node's address stays unanswered)."""
        pids = self.pids(node)
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        self.init_pids.pop(node, None)
        for name in [n for n in self.daemons if n.endswith(f"-n{node}")]:
            self.daemons.pop(name)
        self._save()
        return pids

    def pids(self, node: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns(node)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def down(self) -> None:
        """Kill every process in the namespaces, stop munged, delete the namespaces. Safe to call twice."""
        for pid in self.daemons.values():  # daemons first, so none restarts a child
            _kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        for node in (1, 2):
            if Path(f"/run/netns/{self.netns(node)}").exists():
                for pid in self.pids(node):
                    _kill(pid, signal.SIGKILL)
        for pid in [*self.daemons.values(), *self.init_pids.values()]:
            _kill(pid, signal.SIGKILL)
        for node in (1, 2):
            subprocess.run(["ip", "netns", "del", self.netns(node)], capture_output=True)
        self.daemons.clear()
        self.init_pids.clear()
        self._save()

    def __enter__(self) -> TwoNodeCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- running things on a node ------------------------------------------------------------

    def command(self, node: int, cmd: list[str], cwd: str | Path | None = None) -> list[str]:
        """`cmd` inside node's namespaces (nsenter resets the directory on entering the mount namespace)."""
        pid = self.init_pids[node]
        wd = str(Path(cwd or os.getcwd()).resolve())
        return [_tool("nsenter"), "-t", str(pid), "-n", "-u", "-m", f"--wd={wd}", "--", *cmd]

    def run(
        self, node: int, cmd: list[str], check: bool = True, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        out = subprocess.run(
            self.command(node, cmd, kw.pop("cwd", None)), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{cmd} on node {node} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def popen(self, node: int, cmd: list[str], log: Path, cwd=None, env=None) -> subprocess.Popen:
        """Start `cmd` on the node in its own process group, output to `log`."""
        with open(log, "ab") as f:
            return subprocess.Popen(
                self.command(node, cmd, cwd),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env or self.env,
                start_new_session=True,
            )

    def spawn(self, node: int, name: str, cmd: list[str]) -> None:
        proc = self.popen(node, cmd, self.root / "logs" / f"{name}.log")
        self.daemons[name] = proc.pid
        self._save()

    # -- Slurm clients (run on node 1, where slurmctld listens) -------------------------------

    def client(self, cmd, cwd=None, env=None, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.run(1, cmd, check=False, timeout=timeout, cwd=cwd, env=env or self.env)

    # -- internals ---------------------------------------------------------------------------

    def _save(self) -> None:
        state = {"prefix": self.prefix, "init_pids": self.init_pids, "daemons": self.daemons}
        (self.root / "cluster.json").write_text(json.dumps(state))

    @classmethod
    def load(cls, root: Path) -> TwoNodeCluster:
        """The cluster `up` left running in `root` (for scripts/testcluster down / exec)."""
        state = json.loads((Path(root) / "cluster.json").read_text())
        cluster = cls(root, state["prefix"])
        cluster.init_pids = {int(k): v for k, v in state["init_pids"].items()}
        cluster.daemons = state["daemons"]
        return cluster

    def _wait(self, ready, timeout: float, what: str) -> None:
        def failed():
            for name, pid in self.daemons.items():
                if not _alive(pid):
                    return f"{name} exited:\n{_tail(self.root / 'logs' / f'{name}.log')}"
            return None

        wait_until(ready, timeout, what, failed, self.logs)


def _sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""
