"""A real Prometheus scrapes the real sidecar and agent processes; the dashboard works on them.

test_dashboard.py checks the dashboard against registries observed in-process, value by value.
This test closes the loop with the programs themselves, configured as a pod and a DaemonSet
are: after a cold materialise, a switch to a revision the agent prefetched, a switch back and a
second pod's warm start, every PromQL expression of the dashboard, evaluated through
Prometheus's HTTP API for this node and dataset, returns a number, and the counters say what
happened (misses on the cold start, hits on the warm one, bytes from the remote only once).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from datapin_sidecar.node.agent import prefetch_file_text
from datapin_sidecar.node.settings import DatasetSettings

from testkit.dashboard import expand, load_dashboard, metric_names, panel_queries
from testkit.dvcremote import S3DvcFixture
from testkit.faultproxy import FaultProxy
from testkit.prometheus import PrometheusServer, sample_value
from testkit.sidecarproc import Pod, SidecarProcess, serving

DASHBOARD = Path(__file__).resolve().parents[1] / "charts/datapin/dashboards/datapin.json"


def test_prometheus_scrapes_sidecar_and_agent_and_every_panel_has_data(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
    prometheus: PrometheusServer,
) -> None:
    a, b = dvc3_revisions
    node = f"node-{secrets.token_hex(3)}"
    pod = Pod(xfs_dir, tmp_path / "pod1", a, fault_proxy.endpoint)
    pod.pin(a.rev, "v1")
    warm_pod = Pod(xfs_dir, tmp_path / "pod2", a, fault_proxy.endpoint)
    warm_pod.pin(a.rev, "v1")
    prefetch_file = tmp_path / "prefetch.json"
    agent = SidecarProcess(
        "agent",
        tmp_path,
        {
            "root": str(xfs_dir),
            "gc_interval_seconds": "0.5",
            "prefetch_file": str(prefetch_file),
            "prefetch_interval_seconds": "0.2",
            "log_format": "json",
        },
    )
    cold = SidecarProcess("run", tmp_path, pod.settings())
    warm = SidecarProcess("run", tmp_path, warm_pod.settings())
    jobs = {
        f"{name}-{node}": proc for name, proc in (("agent", agent), ("cold", cold), ("warm", warm))
    }
    for job, proc in jobs.items():
        prometheus.add_target(job, f"127.0.0.1:{proc.port}", {"node": node})
    # Slow enough that Prometheus scrapes the sidecar's zero series before its first publish,
    # so increase() over the range sees the cold start.
    fault_proxy.latency(4.0, method="GET", path=".dir", times=1)
    sel = f'node="{node}", dataset="images"'
    try:
        agent.start()
        prometheus.wait_for(f'datapin_volume_size_bytes{{node="{node}"}} > 0', timeout=60)
        cold.start()
        prometheus.wait_for(f"datapin_cache_miss_objects_total{{{sel}}} == 0", timeout=60)
        cold.wait_until("A published", lambda: cold.get("/readyz")[0] == 200)
        prometheus.wait_for(f"datapin_cache_miss_objects_total{{{sel}}} == {len(a.files)}")
        # The agent prefetches B; the pod's switch to B then links B's new files from the
        # cache (hits), and the way back to A reuses the retired tree.
        entry = DatasetSettings.model_validate({**pod.dataset, "pin": b.rev, "ref": "v2"})
        prefetch_file.write_text(prefetch_file_text([entry]))
        agent.wait_until(
            "B warm", lambda: agent.sample("datapin_prefetch_revisions", state="warm") == 1
        )
        pod.pin(b.rev, "v2")
        cold.wait_until("B served", lambda: serving(cold, b.rev))
        pod.pin(a.rev, "v1")
        cold.wait_until("A served again", lambda: serving(cold, a.rev))
        # A second pod on the node: a warm start.
        fault_proxy.reset_counters()
        warm.start()
        warm.wait_until("warm pod ready", lambda: warm.get("/readyz")[0] == 200)
        assert fault_proxy.gets() == []
        hits = cold.sample("datapin_cache_hit_objects_total", dataset="images")
        assert hits > 0, "the switch to the prefetched B must link cached objects"
        prometheus.wait_for(
            f'datapin_cache_hit_objects_total{{{sel}, job="cold-{node}"}} == {hits}'
            f' and on() datapin_cache_hit_objects_total{{{sel}, job="warm-{node}"}}'
            f" == {len(a.files)}",
            timeout=30,
        )

        # Every panel's expression, as Grafana sends it for this node and dataset.
        empty = []
        for title, expr in panel_queries(load_dashboard(DASHBOARD)):
            if all(name.startswith("datapin_csi_") for name in metric_names(expr)):
                # No pod here uses a csi volume: the node plugin's panels get their data in
                # tests/test_dashboard.py (live Prometheus) and the plugin's own metrics are
                # checked against a real publish in tests/test_csi_node.py.
                continue
            if all(name.startswith("datapin_operator_") for name in metric_names(expr)):
                # No operator runs here: its row gets data in tests/test_dashboard.py (live
                # Prometheus) and the real operator's /metrics is checked after real admissions
                # in tests/test_operator_webhook.py.
                continue
            promql = expand(expr, rate_interval="1m", range_="10m", node=node, dataset="images")
            try:
                prometheus.wait_for_number(promql, timeout=20)
            except AssertionError as exc:
                empty.append(f"{title}: {promql}\n  {exc}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # What the egress panel shows is what crossed the wire, once.
        fetched = sample_value(
            prometheus.query(
                f"sum(max_over_time(datapin_remote_fetched_bytes_total{{{sel}}}[10m]))"
            )[0]
        )
        assert fetched == sum(  # the cold start's download and the agent's prefetch of B
            proc.sample("datapin_remote_fetched_bytes_total", dataset="images")
            for proc in (cold, agent)
        )
        assert fetched > sum(len(v) for v in a.files.values())
        for proc in (warm, cold, agent):
            assert proc.stop() == 0, proc.output()[-2000:]
    finally:
        for proc in (warm, cold, agent):
            proc.stop()
        for job in jobs:
            prometheus.remove_target(job)
