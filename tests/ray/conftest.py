"""One Ray for the whole Ray test session, and the kvarn app deployed from deployments/kvarn.yaml.

Ray: ``ray.init(num_cpus=2)`` (the machine's cores: logical CPUs are what Serve packs
replicas into, and the YAML's 0.1 + 0.4 + 0.4 CPUs per replica set fit 2 with room for
the TP test's workers), no dashboard, a 1 GiB object store (payloads here are a few MiB).
Serve listens on a free loopback port with access logs off.

The app is built exactly as ``serve run deployments/kvarn.yaml`` builds it: the YAML's
``args`` through ``kvarn_ray.app.build_app`` (test_openai_api.py checks that the
builder's default deployment options equal the YAML's ``deployments:`` section).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KVARN_YAML = REPO / "deployments" / "kvarn.yaml"
APP_NAME = "kvarn"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_yaml_config(path: Path = KVARN_YAML) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def yaml_app_args(path: Path = KVARN_YAML) -> dict:
    (app,) = [a for a in load_yaml_config(path)["applications"] if a["name"] == APP_NAME]
    return dict(app["args"])


@pytest.fixture(scope="session")
def ray_cluster():
    """Ray + Serve, started once; yields the HTTP base URL (http://127.0.0.1:PORT)."""
    import ray
    from ray import serve

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3,
             log_to_driver=bool(os.environ.get("KVARN_TEST_RAY_LOGS")),
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False})
    print(f"\nray + serve up in {time.perf_counter() - t0:.1f} s (port {port})")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _deploy(args: dict, name: str = APP_NAME, route_prefix: str = "/"):
    """serve.run(build_app(args)); returns the ingress handle."""
    from ray import serve

    from kvarn_ray.app import build_app

    t0 = time.perf_counter()
    handle = serve.run(build_app(args), name=name, route_prefix=route_prefix)
    print(f"\napp {name!r} ready in {time.perf_counter() - t0:.1f} s")
    return handle


@pytest.fixture(scope="module")
def kvarn_app(ray_cluster):
    """The YAML's app, for one test module; deleted afterwards (frees its CPUs for the next)."""
    from ray import serve

    args = yaml_app_args()
    handle = _deploy(args)
    yield {"base_url": ray_cluster, "handle": handle, "args": args}
    serve.delete(APP_NAME)


@pytest.fixture(scope="session")
def kvarn_yaml() -> dict:
    """deployments/kvarn.yaml, parsed."""
    return load_yaml_config()


@pytest.fixture(scope="session")
def kvarn_args() -> dict:
    """The ``args:`` of the YAML's "kvarn" application."""
    return yaml_app_args()


@pytest.fixture(scope="session")
def deploy_app(ray_cluster):
    """``deploy_app(args, name=..., route_prefix=...)`` -> ingress handle (serve.run(build_app))."""
    return _deploy
