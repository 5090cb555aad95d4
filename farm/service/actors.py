"""The controller made a Ray actor: named, detached, restarted by Ray when its process dies.

Ray keeps the actor's constructor arguments (the farm config) and runs ``__init__`` again
in a new process after a crash; ``FarmController.__init__`` finds its pools' workers by name
and recovers its runs from the state root, so nothing else is needed for fault tolerance.
Threaded (``max_concurrency``): the loop thread and the callers' threads share the actor.
"""
from __future__ import annotations

from typing import Any

from .secrets import NAMESPACE

CONTROLLER_NAME = "lora-farm-controller"
#: The controller's calls at once: its loop thread plus status / submit / workers callers.
CONTROLLER_THREADS = 16


def controller_handle() -> Any | None:
    """The running farm's controller on the connected cluster, or None when no farm is up."""
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def start_controller(config: Any, backend_factories: dict | None = None) -> Any:
    """Create the controller (or get the one running) with ``config``; returns its handle.

    ``backend_factories``: pool name -> the workers' backend factory, for measurement
    backends no manifest may name (``testsupport``); the CLI never passes any."""
    import ray

    from .controller import FarmController

    cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=CONTROLLER_THREADS)(FarmController)
    return cls.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(
        config, backend_factories=backend_factories)
