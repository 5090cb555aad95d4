"""Two Ray nodes on one machine, each with its own logical GPUs and its own LoRA cache dir:
a manifest runs across both, and each node downloads each LoRA at most once."""
from __future__ import annotations

import os

import pytest
import ray

from farm.dispatcher import Dispatcher
from farm.scheduler import AffinityScheduler
from jobs.manifest import validate_manifest
from testsupport import lora as T
from tests.farm.test_run import tiny_shapes
from tests.storage.servers import FaultyHTTPServer
from workers.actor import remote_worker


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 2, "resources": {"node_a": 2}, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=2, resources={"node_b": 2}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_each_download_each_lora_at_most_once(two_nodes, tmp_path):
    with FaultyHTTPServer() as srv:
        uris = {}
        for i, include in enumerate([("attn.to_q",), ("attn.to_v",), ("img_mlp",)]):
            layers = T.random_layers(tiny_shapes(include), rank=4, seed=i, scale=0.3)
            path = T.write_safetensors(tmp_path / f"l{i}.safetensors", T.peft_state_dict(layers))
            uris[f"/l{i}.safetensors"] = srv.add(f"/l{i}.safetensors", open(path, "rb").read())
        sets = [[u] for u in uris.values()] + [list(uris.values())[:2]]
        out = str(tmp_path / "out")
        m = validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                               "output": out, "jobs": [{"prompt": f"p{i}", "seed": i, "loras": [{"uri": u} for u in sets[i % 4]]}
                                                       for i in range(16)]})
        cls = remote_worker(num_gpus=1)
        cache = str(tmp_path / "cache-{node}")
        handles = {}
        for node in ("node_a", "node_b"):
            for k in range(2):
                handles[f"{node}-{k}"] = cls.options(resources={node: 1}).remote(
                    model=m.model, worker_id=f"{node}-{k}", cache_dir=cache, num_threads=1)
        node_of = dict(zip(handles, ray.get([h.node.remote() for h in handles.values()])))
        assert len(set(node_of.values())) == 2
        rows = []
        d = Dispatcher(handles, AffinityScheduler(), out, on_rows=rows.extend, node_of=node_of, retries=1, max_batch=2)
        stats = d.run(m.jobs)
        assert stats.ok == 16, [r.error for r in rows if r.status != "ok"]
        assert {node_of[r.worker_id] for r in rows} == set(node_of.values()), "both nodes rendered"
        for path in uris:
            assert 1 <= srv.gets(path) <= 2, f"{path}: {srv.gets(path)} downloads for 2 nodes"
        caches = [p for p in os.listdir(tmp_path) if p.startswith("cache-")]
        assert len(caches) == 2, "each node kept its own cache dir"
        for h in handles.values():
            ray.kill(h)
