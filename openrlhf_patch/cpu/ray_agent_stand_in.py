"""Stands in for Ray's dashboard agent on a CPU run's private node (openrlhf_patch/cpu/early_ray.py).

Ray's raylet starts the dashboard agent (`ray/dashboard/agent.py`: metrics export, the node's HTTP
API for the dashboard, job submission and state queries, ~80 MB) and waits until it has written
its ports into the session folder. A private single-node run uses none of those services, so this
process writes what Ray's own agent writes when they are off ("-1": Ray's minimal install and an
agent whose HTTP server did not start) and then only waits for its raylet to end. The raylet stops
if its agent exits, so this must not; it ends when the raylet does (its parent changes).

Run as `python -S ray_agent_stand_in.py <the agent's own arguments>`: standard library only.
"""
import os
import sys
import time

# Ray's port names (ray._raylet *_PORT_NAME): the raylet waits for each file
PORT_FILES = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port")
NOT_IN_USE = "-1"


def _argument(argv, name):
    prefix = f"--{name}="
    for arg in argv:
        if arg.startswith(prefix):
            return arg[len(prefix):]
    raise SystemExit(f"ray_agent_stand_in: no {prefix}... argument in {argv}")


def write_ports(session_dir: str, node_id: str) -> None:
    for name in PORT_FILES:
        path = os.path.join(session_dir, f"{name}_{node_id}")
        with open(path + ".tmp", "w") as f:  # whole or not at all: the raylet polls for the file
            f.write(NOT_IN_USE)
        os.replace(path + ".tmp", path)


def main(argv) -> None:
    # As Ray's agent does: the raylet gives its pid, and its child is reparented when it ends.
    raylet = int(os.environ.get("RAY_RAYLET_PID") or os.getppid())
    write_ports(_argument(argv, "session-dir"), _argument(argv, "node-id"))
    while os.getppid() == raylet:
        time.sleep(1.0)


if __name__ == "__main__":
    main(sys.argv[1:])
