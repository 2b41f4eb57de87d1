"""Placement: the cluster's shape (autoscaler capacity included), the GPU default, the drivers'
resource and the shared-storage rule - pure, plus the shape read off a live Ray instance."""

from __future__ import annotations

import pytest

from vfx_ray.errors import VfxError
from vfx_ray.runtime import placement
from vfx_ray.runtime.placement import ClusterShape

LAUNCHER = {
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0, "vfx_driver": 1000}},
        "gpu_worker": {"min_workers": 0, "max_workers": 10, "resources": {"CPU": 16, "GPU": 1}},
        "cpu_worker": {"min_workers": 0, "max_workers": 6, "resources": {"CPU": 16}},
    },
}


def test_launcher_capacity_counts_what_the_autoscaler_can_add():
    assert placement.launcher_capacity(LAUNCHER) == (True, 10)
    fixed = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 8}}, "w": {"min_workers": 2, "max_workers": 2, "resources": {"GPU": 4}}}}
    assert placement.launcher_capacity(fixed) == (False, 8)
    assert placement.launcher_capacity({}) == (False, 0)


def test_gpus_by_default_when_the_cluster_has_or_can_get_them():
    at_zero = ClusterShape(nodes=1, gpus=0, max_gpus=10, autoscaling=True)
    assert placement.use_gpu(None, at_zero) and placement.use_gpu(None, ClusterShape(gpus=1, max_gpus=1))
    assert not placement.use_gpu(None, ClusterShape())
    assert not placement.use_gpu(False, at_zero) and placement.use_gpu(True, ClusterShape())


def test_drivers_ask_for_the_head_resource_when_there_is_one():
    assert placement.driver_resources(ClusterShape(driver_resource=True)) == {"cpu": 0, "vfx_driver": 1}
    assert placement.driver_resources(ClusterShape()) == {"cpu": 0, "memory": placement.DRIVER_MEMORY}


def test_local_paths_are_refused_where_other_nodes_cannot_see_them(tmp_path):
    paths = {"--crops": "s3://b/crops.parquet", "--out": str(tmp_path / "run")}
    placement.check_shared_storage(paths, ClusterShape(nodes=1))  # one machine: fine
    for shape in (ClusterShape(nodes=3), ClusterShape(nodes=1, autoscaling=True)):
        with pytest.raises(VfxError, match=r"--out .*/run is a local path.*s3://") as e:
            placement.check_shared_storage(paths, shape)
        assert "\n" not in str(e.value)
    placement.check_shared_storage(paths, ClusterShape(nodes=3), shared_fs=[str(tmp_path)])
    with pytest.raises(VfxError, match="--out"):  # a sibling folder's name is no prefix match
        placement.check_shared_storage({"--out": f"{tmp_path}-x/run"}, ClusterShape(nodes=3), [str(tmp_path)])
    placement.check_shared_storage({"--out": None, "--model": "s3://b/m"}, ClusterShape(nodes=3))


def test_shape_of_a_live_instance_reads_the_launcher_config(ray_session, tmp_path, monkeypatch):
    import yaml

    from vfx_ray.runtime import session

    config = tmp_path / "ray_bootstrap_config.yaml"
    config.write_text(yaml.safe_dump(LAUNCHER))
    monkeypatch.setenv(session.LAUNCHER_CONFIG_ENV, str(config))
    session.cluster_shape.cache_clear()
    try:
        shape = session.cluster_shape()
        assert shape == ClusterShape(nodes=1, gpus=0, max_gpus=10, autoscaling=True, driver_resource=False)
        monkeypatch.setenv(session.LAUNCHER_CONFIG_ENV, str(tmp_path / "none.yaml"))
        session.cluster_shape.cache_clear()
        assert session.cluster_shape() == ClusterShape(nodes=1)
    finally:
        session.cluster_shape.cache_clear()


def test_orphaned_worker_groups_are_told_from_live_and_foreign_ones():
    from types import SimpleNamespace as A

    from vfx_ray.runtime.orphans import GRACE_S, orphaned

    cpu = {"CPU": 1.0}

    def group(job="01", state="CREATED", bundles=(cpu,)):
        return {"state": state, "creator_job_id": job, "bundles": list(bundles)}

    groups = {"dead": group(), "live": group(), "empty": group(), "other-job": group(job="02"),
              "tune-trial": group(bundles=({"CPU": 0.01},)), "removed": group(state="REMOVED")}
    actors = [A(placement_group_id="dead", state="DEAD"), A(placement_group_id="live", state="DEAD"),
              A(placement_group_id="live", state="ALIVE"), A(placement_group_id="other-job", state="DEAD"),
              A(placement_group_id="tune-trial", state="DEAD"), A(placement_group_id=None, state="ALIVE")]
    since: dict[str, float] = {}
    assert orphaned(groups, actors, "01", cpu, since, now=100.0) == ["dead"]  # held workers, all dead
    assert orphaned(groups, actors, "01", cpu, since, now=100.0 + GRACE_S - 1) == ["dead"]
    assert orphaned(groups, actors, "01", cpu, since, now=100.0 + GRACE_S) == ["dead", "empty"]  # never got workers
    assert orphaned(groups, actors, "01", {"CPU": 2.0, "GPU": 1.0}, {}, now=0.0) == []  # another worker shape
