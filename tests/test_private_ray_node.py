"""A run's own Ray node is the run's alone (issue 29): every TCP socket its processes listen on is on
the loopback address, nothing answers on the machine's other addresses, and a process outside the
run (without the run's token) cannot join it and run code, while one with the token can. The node
starts in a child process as `ngrpo train` starts it (training.local_node_kwargs, early_ray.take
before ray.init): the lean node started early (CPU runs) and the full node Ray starts when none was
started early (GPU runs). With RAY_ADDRESS nothing of this is done (docs/RUNNING.md)."""
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

# The run's side: start the node as _launch does, run a task and an actor (each worker has a server
# of its own) through a runtime env (the runtime env agent), report, and hold the node until stdin ends.
HOLD_NODE = """
import json, os, sys
import ray
from openrlhf_patch.cpu import early_ray
from pipelines.launch import training

kwargs = training.local_node_kwargs("cpu", 2)
kwargs["runtime_env"] = {"env_vars": {"NGRPO_PRIVATE_NODE_PROBE": "1"}}
if sys.argv[1] == "early":
    early_ray.start(training.local_node_kwargs("cpu", 2))
early = early_ray.take(kwargs)
assert (early is not None) == (sys.argv[1] == "early")
early.init(kwargs) if early is not None else ray.init(**kwargs)

@ray.remote
class Actor:
    def env(self):
        return os.environ.get("NGRPO_PRIVATE_NODE_PROBE")

actor = Actor.remote()
assert ray.get(actor.env.remote()) == "1"
assert ray.get(ray.remote(lambda: os.environ.get("NGRPO_PRIVATE_NODE_PROBE")).remote()) == "1"
node = ray._private.worker._global_node
print(json.dumps({"pid": os.getpid(), "gcs": node.gcs_address, "node_ip": node.node_ip_address,
                  "runtime_env_agent_port": node.runtime_env_agent_port,
                  "dashboard_agent_port": node.address_info["dashboard_agent_listen_port"],
                  "token_file": os.environ.get("RAY_AUTH_TOKEN_PATH"), "auth_mode": os.environ.get("RAY_AUTH_MODE"),
                  "token_in_env": "RAY_AUTH_TOKEN" in os.environ}), flush=True)
sys.stdin.read()
ray.shutdown()
if early is not None:
    early.release()
"""

# Someone else's process on this machine: join the node's GCS and run code that leaves a marker.
OUTSIDER = """
import sys, time
import ray
start = time.time()
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    ray.get(ray.remote(lambda path: open(path, "w").write("ran")).remote(sys.argv[2]))
    print("JOINED", round(time.time() - start, 1))
except Exception as err:
    print("REFUSED", type(err).__name__, round(time.time() - start, 1))
"""


@pytest.fixture(scope="module", params=["early", "plain"])
def node(request, tmp_path_factory):
    """A run's private node in a child process: its report (HOLD_NODE), while it runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    log = tmp_path_factory.mktemp("node") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_NODE, request.param], cwd=REPO, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=60)
            pytest.fail(f"the node did not come up:\n{log.read_text()[-6000:]}")
        yield {**json.loads(line), "layout": request.param}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _listening(pid):
    """(pid, process, address, port) of every listening TCP socket of PID and its descendants."""
    root = psutil.Process(pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()).replace("\n", " ")[:100] or proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        out += [(proc.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _table(sockets) -> str:
    return "\n".join(f"  pid {pid:>7} {ip}:{port:<6} {name}" for pid, name, ip, port in sockets)


@pytest.mark.pipeline
def test_every_socket_the_node_listens_on_is_on_loopback(node):
    sockets = _listening(node["pid"])
    names = " | ".join(name for _, name, _, _ in sockets)
    # what was listed is the node: the GCS, the raylet (two servers: node manager, object manager),
    # the runtime env agent, the driver and the workers of the task and the actor
    assert "gcs_server" in names and "raylet" in names and "RuntimeEnvAgent" in names, _table(sockets)
    assert sum(1 for _, name, _, _ in sockets if name.startswith("ray::")) >= 3, _table(sockets)
    assert len(sockets) >= 7, _table(sockets)
    off_loopback = [s for s in sockets if not _is_loopback(s[2])]
    assert not off_loopback, f"listening off the loopback address:\n{_table(off_loopback)}\nall:\n{_table(sockets)}"
    assert node["node_ip"] == "127.0.0.1" and node["gcs"].startswith("127.0.0.1:")


@pytest.mark.pipeline
def test_nothing_of_the_node_answers_on_the_machines_other_addresses(node):
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]
    if not others:
        pytest.skip("this machine has no address but loopback")
    ports = sorted({port for _, _, _, port in _listening(node["pid"])})
    answered = []
    for address in others:
        for port in ports:
            try:
                socket.create_connection((address, port), timeout=2).close()
                answered.append(f"{address}:{port}")
            except ConnectionRefusedError:
                pass
    assert not answered, answered
    assert ports  # it had ports to try


# One harmless call of each of Ray's gRPC services, with an empty request; a server answers the
# services it does not serve with UNIMPLEMENTED before it looks at the token.
RAY_GRPC_CALLS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
                  "/ray.rpc.ObjectManagerService/FreeObjects", "/ray.rpc.CoreWorkerService/NumPendingTasks")


@pytest.mark.pipeline
def test_every_grpc_server_of_the_node_refuses_a_call_without_the_token(node):
    """The GCS, the raylet's node manager and object manager, the driver's and every worker's core
    worker server: a raw gRPC call on 127.0.0.1 without the token is UNAUTHENTICATED."""
    import grpc

    servers = [(pid, name, port) for pid, name, _, port in _listening(node["pid"])
               if pid == node["pid"] or "gcs_server" in name or "raylet" in name
               or (name.startswith("ray::") and "Agent" not in name)]
    answers = {}
    for pid, name, port in servers:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            codes = []
            for method in RAY_GRPC_CALLS:
                try:
                    channel.unary_unary(method)(b"", timeout=10)
                    codes.append("OK")
                except grpc.RpcError as err:
                    codes.append(err.code().name)
        answers[f"{pid} {port} {name[:40]}"] = codes
    assert len(servers) >= 6, answers  # driver, GCS, raylet x2, the task's and the actor's workers
    assert all("OK" not in codes and "UNAUTHENTICATED" in codes for codes in answers.values()), answers


@pytest.mark.pipeline
def test_the_agents_http_servers_refuse_a_request_without_the_token(node):
    """The runtime env agent (it installs what a runtime env asks for) and, on the full node, the
    dashboard agent (job submission): 401 without the token."""
    import urllib.error
    import urllib.request

    servers = [(node["runtime_env_agent_port"], "/get_or_create_runtime_env")]
    if node["layout"] == "early":
        assert node["dashboard_agent_port"] == -1  # the stand-in: no agent, no server
    else:
        servers.append((node["dashboard_agent_port"], "/api/job_agent/jobs/"))
    for port, path in servers:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST"),
                                   timeout=10)
        assert refused.value.code == 401, (port, path)


def _outsider(node, tmp_path, env_update):
    marker = tmp_path / f"ran-{len(list(tmp_path.iterdir()))}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    # Ray's ray.init would swap 127.0.0.1 for the machine's address, where nothing answers (above):
    # this outsider knows better and reaches the node on loopback, as the probe of issue 29 did.
    # Ray retries a refused GCS once a second, 20 times; twice shows the refusal.
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_NUM_REDIS_GET_RETRIES="2", **env_update)
    proc = subprocess.run([sys.executable, "-c", OUTSIDER, node["gcs"], str(marker)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    return proc, marker


@pytest.mark.pipeline
@pytest.mark.parametrize("credentials", ["no token", "another token"])
def test_a_process_outside_the_run_cannot_join_it(node, tmp_path, credentials):
    """Through 127.0.0.1, the way the probe of issue 29 joined the node and ran code in 0.9 s."""
    update = {} if credentials == "no token" else {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    proc, marker = _outsider(node, tmp_path, update)
    assert proc.stdout.startswith("REFUSED"), proc.stdout + proc.stderr[-4000:]
    assert "Authentication token is missing or incorrect" in proc.stderr, proc.stderr[-4000:]
    assert not marker.exists()


@pytest.mark.pipeline
def test_a_process_with_the_runs_token_joins(node, tmp_path):
    """The control: the same outsider given the run's token file joins and runs its code, so what
    refuses the others is the token."""
    assert node["auth_mode"] == "token" and not node["token_in_env"]  # the run's driver: the path only
    proc, marker = _outsider(node, tmp_path, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": node["token_file"]})
    assert proc.stdout.startswith("JOINED"), proc.stdout + proc.stderr[-4000:]
    assert marker.read_text() == "ran"


TOKEN_CYCLES = """
import json, os
from openrlhf_patch.cpu import early_ray
cycles = []
for _ in range(2):
    path = early_ray.secure_private_node()
    assert early_ray.secure_private_node() == path  # one token per node
    cycles.append({"path": path, "token": open(path).read(), "file": os.stat(path).st_mode,
                   "folder": os.stat(os.path.dirname(path)).st_mode, "mode": os.environ["RAY_AUTH_MODE"],
                   "env_token": os.environ.get("RAY_AUTH_TOKEN")})
    early_ray.release_private_node()
    cycles[-1].update(after={k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")},
                      folder_left=os.path.exists(os.path.dirname(path)))
print(json.dumps(cycles))
"""


def test_each_node_has_a_fresh_token_only_its_user_can_read():
    """A token per node, 0600 in a 0700 folder; Ray's processes get only its path (and not a
    RAY_AUTH_TOKEN of the user's, which Ray would read first). Once the node is released, the
    folder is gone and the process's settings are its own again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_TOKEN"] = "a token of the user's for some cluster"
    cycles = json.loads(subprocess.run([sys.executable, "-c", TOKEN_CYCLES], cwd=REPO, env=env, capture_output=True,
                                       text=True, timeout=120, check=True).stdout)
    assert cycles[0]["token"] != cycles[1]["token"] and len(cycles[0]["token"]) == 64
    for cycle in cycles:
        assert stat.S_IMODE(cycle["file"]) == 0o600 and stat.S_IMODE(cycle["folder"]) == 0o700
        assert cycle["mode"] == "token" and cycle["env_token"] is None
        assert cycle["after"] == {"RAY_AUTH_TOKEN": "a token of the user's for some cluster"}
        assert not cycle["folder_left"]


def test_a_killed_processs_token_folder_goes_with_the_next_one():
    script = ("import os\nfrom openrlhf_patch.cpu import early_ray\n"
              "print(early_ray.secure_private_node(), flush=True)\nos._exit(0)")
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=True).stdout.strip()  # os._exit: no atexit, as a killed process
    assert Path(killed).exists()
    subprocess.run([sys.executable, "-c", script.replace("os._exit(0)", "")], cwd=REPO, timeout=120, check=True,
                   capture_output=True)
    assert not Path(killed).parent.exists()


NODE_AND_AFTER = """
import json, os, sys
import ray
from ray._private import node as ray_node
from openrlhf_patch.cpu import early_ray
from pipelines.launch import training

build = ray_node.Node
kwargs = training.local_node_kwargs("cpu", 1)
if sys.argv[1] == "early":
    early_ray.start(kwargs)
early = early_ray.take(kwargs)
early.init(kwargs) if early is not None else ray.init(**kwargs)
during = {"ip": ray._private.worker._global_node.node_ip_address, "auth": os.environ.get("RAY_AUTH_MODE"),
          "token_file": os.environ.get("RAY_AUTH_TOKEN_PATH"), "node_class_back": ray_node.Node is build}
ray.shutdown()
if early is not None:
    early.release()
print(json.dumps({"during": during, "after": {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")},
                  "token_left": os.path.exists(during["token_file"]), "node_class_back": ray_node.Node is build}))
"""


@pytest.mark.pipeline
@pytest.mark.parametrize("layout", ["early", "plain"])
def test_the_process_is_as_before_once_the_node_is_shut_down(layout):
    """The process that ran a private node (a test's, say) leaves no Ray setting behind for what it
    does next, such as starting or joining a cluster: Ray's Node class, the environment, the token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", NODE_AND_AFTER, layout], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["during"]["ip"] == "127.0.0.1" and out["during"]["auth"] == "token"
    assert out["during"]["node_class_back"]  # Ray's own class again once the node was built
    assert out == {**out, "after": {}, "token_left": False, "node_class_back": True}


def test_a_run_on_a_cluster_changes_nothing():
    """With RAY_ADDRESS the launch joins the cluster as it is: no loopback address, no token."""
    script = """
import json, os
from ray._private import node as ray_node
from openrlhf_patch.cpu import early_ray
from pipelines.launch import training
build = ray_node.Node
assert training.early_node_kwargs(["--actor.num_nodes", "1"], "cpu") is None
assert early_ray.take({"address": os.environ["RAY_ADDRESS"], "runtime_env": {}}) is None
print(json.dumps({"auth": {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")},
                  "node_class": ray_node.Node is build}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_ADDRESS"] = "10.1.2.3:6379"
    out = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=120, check=True).stdout)
    assert out == {"auth": {}, "node_class": True}


def test_a_take_whose_ray_init_never_comes_leaves_rays_node_class_with_discard():
    """take() makes the launch's next ray.init start a private node; should that ray.init not come,
    `discard` (which `ngrpo train` runs on its way out) gives Ray its own Node class back."""
    script = """
from ray._private import node as ray_node
from openrlhf_patch.cpu import early_ray
from pipelines.launch import training
build = ray_node.Node
assert early_ray.take(training.local_node_kwargs("cpu", 1)) is None
armed = ray_node.Node is not build
early_ray.discard()
print(armed, ray_node.Node is build)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["True", "True"]
