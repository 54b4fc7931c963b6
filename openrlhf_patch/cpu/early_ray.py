"""A CPU run's private Ray node, started while the command still imports and checks its inputs.

On two cores `ray.init` took ~3 s, mostly waiting for Ray's own processes (GCS, raylet, dashboard,
agents) to come up, after ~5 s in which the driver imported transformers, OpenRLHF, DeepSpeed and
vLLM to check the command line. `start(node_kwargs)` begins `ray.init` in a background thread as
soon as the command line is known; `take(node_kwargs)` hands that node to the launch when it was
started with the same node settings, and otherwise stops it (the launch then starts its own).

How, with Ray's own code doing the work: the thread runs `ray.init(**node_kwargs)` and stops it where
it would connect a driver (`ray._private.worker.connect`); `EarlyNode.init(kwargs)` runs the real
`ray.init` (runtime env, job, logging as always) and gives it that node where it would build one
(`ray._private.node.Node`). The thread lives until the node is released: Ray starts its processes
with PR_SET_PDEATHSIG, which kills them when the *thread* that started them ends. A process that
dies takes them along the same way.

Ray's processes inherit this process's environment as it is while they start, so code that runs
meanwhile must not set a variable meant for itself alone (pipelines/export.py wraps torch.load for
its weights-only loads instead of setting TORCH_FORCE_WEIGHTS_ONLY_LOAD, which the resumed run's
DeepSpeed inherited once).

The node is lean (`_LeanNode`): a run's private single-node instance has no use for three of Ray's
processes, which on two cores start beside the driver's imports (tiny run's peak PSS -0.15 GB):
the autoscaler's monitor (a node of fixed size), the dashboard's API server (no dashboard, jobs or
state API is used) and the log monitor, which becomes a thread of the driver (`_follow_logs`, the
loop of Ray's `LogMonitor.run` with a stop), so that workers' lines still reach the run's log.
And the raylet's dashboard agent (metrics export, the dashboard's node API, job submission: ~80 MB)
is a stand-in that tells the raylet those services are off (openrlhf_patch/cpu/ray_agent_stand_in.py).

A private node is the run's alone (`_private_node_class`, docs/RUNNING.md "The run's own Ray
node"), early or not: it has the loopback address, so that every TCP server of the node listens on
127.0.0.1 only, and Ray's token authentication with a token of its own, so that another process of
this machine cannot join it; the process's settings are as before once the node is shut down.
"""
import atexit
import contextlib
import copy
import logging
import os
import sys
import threading
import time
from typing import Optional

NODE_SETTINGS = ("address", "num_cpus", "num_gpus", "include_dashboard", "_system_config")
_early = {"node": None}  # this process's one early start, until taken or discarded


def node_settings(ray_init_kwargs: dict) -> dict:
    """The part of ray.init's arguments that shapes the node (not the job: runtime env, logging)."""
    return {k: v for k, v in ray_init_kwargs.items() if k in NODE_SETTINGS}


class _NodeStarted(Exception):
    pass


@contextlib.contextmanager
def _ray_builds_nodes_with(make_builder):
    """Inside, ray.init builds its Node with `make_builder(Ray's own Node class)`."""
    from ray._private import node as ray_node

    from openrlhf_patch import touchpoints

    _disarm()  # the node built here is made private by early_ray itself
    with touchpoints.patched("ray._private.node.Node", make_builder(ray_node.Node)):
        yield


def _lean_node_class(node_class):
    """Ray's Node that starts no autoscaler monitor, log monitor or API server on the head. Ray
    runs on without an API server (the state a failed one leaves: a warning, no dashboard URL)."""

    class _LeanNode(_private_node_class(node_class)):
        def __init__(self, ray_params, *args, head=False, **kwargs):
            if head:
                ray_params.no_monitor = True
                ray_params.include_log_monitor = False  # EarlyNode._follow_logs does its work
            super().__init__(ray_params, *args, head=head, **kwargs)

        def start_api_server(self, *, include_dashboard, raise_on_failure):
            self._webui_url = None

        def start_raylet(self, *args, **kwargs):
            version = _ray_version()
            if not stand_in_speaks_ray(version):
                print(f"[ngrpo] Ray {version}: its own dashboard agent runs (ngrpo's stand-in speaks "
                      f"Ray {STAND_IN_RAY}x's port files)", file=sys.stderr, flush=True)
                return super().start_raylet(*args, **kwargs)
            with _raylet_starts_agent_stand_in():
                return super().start_raylet(*args, **kwargs)

    return _LeanNode


DASHBOARD_AGENT_FLAG = "--dashboard_agent_command="
# The Ray release whose raylet waits for exactly the port files the stand-in writes. Another Ray
# may wait for others and would then fail at start ("timed out during startup"), so it keeps its
# own agent (~80 MB more) until the stand-in is checked against it.
STAND_IN_RAY = "2.55."


def _ray_version() -> str:
    import ray

    return ray.__version__


def stand_in_speaks_ray(version: str) -> bool:
    return version.startswith(STAND_IN_RAY)


@contextlib.contextmanager
def _raylet_starts_agent_stand_in():
    """Inside, the raylet Ray starts runs openrlhf_patch/cpu/ray_agent_stand_in.py as its dashboard agent,
    with the agent's own arguments."""
    import functools
    import os

    from ray._private import ray_constants, services

    from openrlhf_patch import touchpoints

    start = services.start_ray_process
    stand_in = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_agent_stand_in.py")

    @functools.wraps(start)
    def start_ray_process(command, process_type, *args, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_RAYLET:
            command = [_with_stand_in(arg, stand_in) if arg.startswith(DASHBOARD_AGENT_FLAG) else arg
                       for arg in command]
        return start(command, process_type, *args, **kwargs)

    with touchpoints.patched("ray._private.services.start_ray_process", start_ray_process):
        yield


def _with_stand_in(flag: str, stand_in: str) -> str:
    """The raylet's --dashboard_agent_command flag with Ray's agent script swapped for STAND_IN
    (`python -S`: no site-packages to import) and the agent's arguments kept."""
    import shlex
    import subprocess

    agent = shlex.split(flag[len(DASHBOARD_AGENT_FLAG):])
    script = next(i for i, arg in enumerate(agent) if arg.endswith("agent.py"))
    return DASHBOARD_AGENT_FLAG + subprocess.list2cmdline([sys.executable, "-S", stand_in, *agent[script + 1:]])


class EarlyNode:
    def __init__(self, node_kwargs: dict):
        self.node_kwargs = node_settings(node_kwargs)
        self.node = None
        self.error: Optional[BaseException] = None
        self._ready, self._released = threading.Event(), threading.Event()
        self._log_thread: Optional[threading.Thread] = None
        # Ray's modules are imported here, in the calling thread, so that the thread imports next
        # to nothing while the caller goes on importing the stack (two threads importing modules
        # that import each other can deadlock on Python's per-module import locks).
        import ray._private.node  # noqa: F401
        import ray._private.worker  # noqa: F401

        self._thread = threading.Thread(target=self._start, name="ngrpo-early-ray", daemon=True)
        self._thread.start()

    def _start(self):
        import ray

        from openrlhf_patch import touchpoints

        def stop_before_connecting(node, *args, **kwargs):
            self.node = node
            raise _NodeStarted()

        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        ray_logger.setLevel(logging.ERROR)  # the launch's own ray.init logs what a user needs
        try:
            # a Ray without worker.connect fails here (TouchpointError): take() declines the node
            with touchpoints.patched("ray._private.worker.connect", stop_before_connecting), \
                    _ray_builds_nodes_with(_lean_node_class):
                # a copy: ray.init writes into _system_config, and take() compares the settings
                ray.init(configure_logging=False, **copy.deepcopy(self.node_kwargs))
        except _NodeStarted:
            pass
        except BaseException as err:  # noqa: BLE001 - take() declines the node; the launch's own
            # ray.init then starts Ray and reports what fails
            self.error = err
        else:
            # a Ray whose ray.init no longer connects through worker.connect: it connected a
            # driver without the run's runtime env, which is undone here
            ray.shutdown()
            self.error = RuntimeError("ray.init connected a driver without ray._private.worker.connect")
        finally:
            ray_logger.setLevel(level)
            self._ready.set()
        self._released.wait()

    def ready(self) -> bool:
        self._ready.wait()
        return self.node is not None and self.error is None

    def init(self, ray_init_kwargs: dict):
        """ray.init(**RAY_INIT_KWARGS) on this node."""
        import ray

        def this_node_as_head(build):
            return lambda *args, **kwargs: self.node if kwargs.get("head") else build(*args, **kwargs)

        with _ray_builds_nodes_with(this_node_as_head):
            context = ray.init(**ray_init_kwargs)
        # imported here, not in the thread, for the reason given in __init__
        from ray._private import log_monitor  # noqa: F401

        self._log_thread = threading.Thread(target=self._follow_logs, name="ngrpo-ray-logs", daemon=True)
        self._log_thread.start()
        return context

    def _follow_logs(self):
        """Ray's log monitor, in this process: publish the workers' new log lines to the drivers."""
        from ray._private import log_monitor
        from ray._raylet import GcsClient

        logging.getLogger(log_monitor.__name__).setLevel(logging.WARNING)  # "Beginning to track file ..."
        node = self.node
        try:
            monitor = log_monitor.LogMonitor(node.node_ip_address, node.get_logs_dir_path(),
                                             GcsClient(address=node.gcs_address), log_monitor.is_proc_alive,
                                             gcs_address=node.gcs_address)
            last_updated = time.time()
            while not self._released.is_set():
                if monitor.should_update_filenames(last_updated):
                    monitor.update_log_filenames()
                    last_updated = time.time()
                monitor.open_closed_files()
                if not monitor.check_log_files_and_publish_updates():
                    self._released.wait(0.1)
        except Exception as err:  # noqa: BLE001 - the run goes on; only its workers' lines stop
            import ray

            if ray.is_initialized():  # not the GCS going away in ray.shutdown
                print(f"[ngrpo] Ray's log monitor stopped ({type(err).__name__}: {err}); workers' output "
                      f"is still in {node.get_logs_dir_path()}", file=sys.stderr, flush=True)

    def stop(self):
        """Kill the node's processes (when no driver ever connected) and end the thread."""
        self._ready.wait()
        if self.node is not None:
            from ray._private import worker

            from openrlhf_patch import touchpoints

            self.node.kill_all_processes(check_alive=False, allow_graceful=True)  # releases the node
            if worker._global_node is self.node:  # state, not a patch: nothing to put back later
                touchpoints.reset("ray._private.worker._global_node", None)
        release_private_node()  # also when none came up
        self.release()

    def release(self):
        """End the thread once the node is shut down (ray.shutdown)."""
        self._released.set()


def start(node_kwargs: dict) -> EarlyNode:
    # Ray starts its processes with a preexec_fn, so each fork in the node's thread takes logging's
    # lock and then the import lock. setuptools' distutils finder imports setuptools while the
    # import lock is held, and that import takes logging's lock: a launch importing DeepSpeed
    # (which imports distutils) at that moment deadlocked, seen twice in CI. Imported here first,
    # distutils is in sys.modules and no finder runs for it again (0.1 s, spent later anyway).
    try:
        import distutils  # noqa: F401
    except ImportError:
        pass
    discard()
    if is_private(node_kwargs):
        # here, not in the node's thread (`_PrivateNode` then finds it done): the environment is
        # not changed while this thread goes on, whose C libraries may read it meanwhile
        secure_private_node()
    _early["node"] = EarlyNode(node_kwargs)
    return _early["node"]


def take(node_kwargs: dict) -> Optional[EarlyNode]:
    """The node started early when its settings are NODE_KWARGS and it came up, else None (a node
    started with other settings, or one that failed, is stopped). The launch calls it right before
    its ray.init: where None comes back for a private node (address "local"), the node that
    ray.init starts next in this process is made private as an early one is (`_arm_private_node`)."""
    early, _early["node"] = _early["node"], None
    if early is not None:
        if early.node_kwargs == node_settings(node_kwargs) and early.ready():
            return early
        early.stop()
    if is_private(node_kwargs):
        _arm_private_node()
    return None


def discard() -> None:
    """Stop a node started early that no launch took (a check failed after it started)."""
    _disarm()  # a take() whose ray.init never came
    early, _early["node"] = _early["node"], None
    if early is not None:
        early.stop()


# --- The run's node is the run's alone ---------------------------------------------------------------
#
# Ray (2.55) binds a node's TCP servers to every interface (the gRPC servers of the GCS, the raylet
# and its object manager, each worker and the driver; the agents' and monitors' metrics and HTTP
# servers), the runtime env agent to the machine's address, unless the node's IP address is the
# loopback one: then each of them listens on 127.0.0.1 (measured: tests/test_private_ray_node.py).
# `ray.init(_node_ip_address="127.0.0.1")` cannot ask for it: Ray swaps a loopback address for the
# machine's own (`services.resolve_ip_for_localhost`) on Linux, so the private node's class sets it.
# Loopback still lets any process of the machine in (the GCS runs whatever a connected driver
# submits), so the node also gets Ray's token authentication (RAY_AUTH_MODE=token): every gRPC
# server of the node and the agents' HTTP APIs refuse a request without the node's token, a fresh
# random one per node (the read-only metrics ports do not ask for it).
LOOPBACK = "127.0.0.1"
AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
TOKEN_FOLDER_PREFIX = "ngrpo-ray-auth-"
_secured = {"pid": None, "folder": None, "env": None}  # the node's token folder; the settings it replaced


def is_private(node_kwargs: dict) -> bool:
    """NODE_KWARGS start a run's private node (training.local_node_kwargs), not join a cluster."""
    return node_kwargs.get("address") == "local"


def _private_node_class(node_class):
    """Ray's Node, as the head of a private node: on the loopback address, secured before its
    processes start (`secure_private_node`), and released when they are killed (ray.shutdown)."""

    class _PrivateNode(node_class):
        def __init__(self, ray_params, *args, head=False, **kwargs):
            if head:
                ray_params.node_ip_address = LOOPBACK
                secure_private_node()
            super().__init__(ray_params, *args, head=head, **kwargs)

        def kill_all_processes(self, *args, **kwargs):
            try:
                return super().kill_all_processes(*args, **kwargs)
            finally:
                release_private_node()

    return _PrivateNode


_armed = {"build": None}  # Ray's own Node class while the next head node is to be private


def _arm_private_node() -> None:
    """The next node `ray.init` starts in this process (the launch's) is a private one; Ray's Node
    class is itself again as soon as it is built, or when early_ray builds a node itself or
    `discard` runs. Nodes built otherwise (`ray.cluster_utils.Cluster`'s) are Ray's own."""
    from ray._private import node as ray_node

    from openrlhf_patch import touchpoints

    if _armed["build"] is not None:
        return
    build = _armed["build"] = ray_node.Node
    private = _private_node_class(build)

    def build_once(*args, **kwargs):
        if not (kwargs.get("head") and kwargs.get("ray_init_cluster")):  # how ray.init starts one
            return build(*args, **kwargs)
        _disarm()
        return private(*args, **kwargs)

    touchpoints.patch("ray._private.node.Node", build_once)


def _disarm() -> None:
    build, _armed["build"] = _armed["build"], None
    if build is not None:
        from openrlhf_patch import touchpoints

        touchpoints.undo("ray._private.node.Node", site="openrlhf_patch/cpu/early_ray.py:_arm_private_node")


def secure_private_node() -> str:
    """Token authentication for the private node about to start: a fresh random token in a file
    only this user can read, named to Ray by RAY_AUTH_TOKEN_PATH (with RAY_AUTH_MODE=token) in
    this process's environment, which the node's processes inherit; the token itself is in no
    environment. Until `release_private_node`; a second call meanwhile changes nothing. Returns
    the token file's path."""
    if _secured["folder"] is None or _secured["pid"] != os.getpid():  # a forked child: its own
        names = (AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV)
        folder = _new_token_folder()
        _secured.update(pid=os.getpid(), folder=folder, env={k: os.environ.get(k) for k in names})
        os.environ.update({AUTH_MODE_ENV: "token", TOKEN_PATH_ENV: os.path.join(folder, "token")})
        os.environ.pop(TOKEN_ENV, None)  # Ray reads RAY_AUTH_TOKEN before the file
        _reload_ray_auth_settings()
    return os.path.join(_secured["folder"], "token")


def release_private_node() -> None:
    """Once the private node's processes are gone: this process's Ray settings as they were
    before `secure_private_node`, and the token gone."""
    import shutil

    if _secured["folder"] is None or _secured["pid"] != os.getpid():
        return
    for name, value in _secured["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(_secured["folder"], ignore_errors=True)
    _secured.update(folder=None, env=None)
    _reload_ray_auth_settings()


def _new_token_folder() -> str:
    """A new folder only this user can enter (mkdtemp: 0700) with a fresh random token (Ray's own
    kind: 256 bits, hex) in a file only this user can read (0600). It goes with the node, or when
    this process exits; the folders of this user's processes that were killed go with the next."""
    import secrets
    import shutil
    import tempfile

    _remove_dead_token_folders()
    folder = tempfile.mkdtemp(prefix=f"{TOKEN_FOLDER_PREFIX}{os.getpid()}-")
    fd = os.open(os.path.join(folder, "token"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(folder, ignore_errors=True))
    return folder


def _remove_dead_token_folders() -> None:
    """The token folders (TOKEN_FOLDER_PREFIX<pid>-...) this user's processes left when they were
    killed: the nodes they guarded died with them."""
    import glob
    import shutil
    import tempfile

    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{TOKEN_FOLDER_PREFIX}*-*")):
        pid = os.path.basename(folder)[len(TOKEN_FOLDER_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or os.stat(folder).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # gone meanwhile, or alive as another user's process
            continue


def _reload_ray_auth_settings() -> None:
    """This process's Ray reads the authentication settings anew (as Ray's own tests do after they
    change them): its C++ config reads RAY_AUTH_MODE when initialised, and it keeps the first
    token it loaded. Not while a driver is connected: its settings are the ones it connected with."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if ray.is_initialized():
        return
    AuthenticationTokenLoader.instance().reset_cache()
    Config.initialize("")


atexit.register(discard)
