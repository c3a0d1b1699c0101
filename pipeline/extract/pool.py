"""The actor pool of an extract run: how many actors and what each holds, an elastic pool's request to the
autoscaler, and whether the cluster can ever place the pool (Ray here, as in driver.py and actor.py).

A fixed pool (`run.actors`, or the default: one actor per GPU, or per node on CPU clusters) is sized from what the
cluster holds at the start. An elastic pool (`run.max_actors`) starts its work with `run.min_actors` actors and asks
for the rest twice over, as every autoscaler understands it: its pending actors are resource demand (KubeRay and
`ray up` run the same autoscaler, which reads it) and `ray.autoscaler.sdk.request_resources` asks for the bundles
outright. Actors join as their nodes do; the request is cleared when the run ends so the cluster can scale down.

A shape no node has and no autoscaler launches for can never be placed: that is the user's to fix (exit 2). A
feasible pool that is not placed yet is waited for, with a line every 30 s, until `run.start_timeout` (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import ray

from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError

WAIT_LINE_SECONDS = 30.0  # how often a pool still being placed says what it waits for
AUTOSCALER_VERDICT_SECONDS = 30.0  # the autoscaler's reports since the request show nothing launching: infeasible
AUTOSCALER_FRESH_SECONDS = 60.0  # an autoscaler whose last report is older is not running
AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # where Ray's autoscaler (monitor) reports, in the GCS' key-value store


class PoolTimeout(RuntimeError):
    """A feasible pool that the cluster did not place within `run.start_timeout` (exit 3)."""


@dataclass(frozen=True)
class PoolPlan:
    """The pool's size (`minimum` ready actors before work starts, up to `maximum`) and each actor's resources."""

    minimum: int
    maximum: int
    num_cpus: float
    num_gpus: float
    elastic: bool

    def bundle(self) -> dict:
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}

    def describe(self) -> str:
        size = f"an elastic pool of {self.minimum}..{self.maximum}" if self.elastic else \
            f"a fixed pool of {self.maximum}"
        return f"{size} actor(s), {self.num_cpus:g} CPUs{f' + {self.num_gpus:g} GPUs' if self.num_gpus else ''} each"


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def fits(resources: dict, plan: PoolPlan) -> bool:
    return resources.get("CPU", 0) >= plan.num_cpus and resources.get("GPU", 0) >= plan.num_gpus


def autoscaler_report() -> dict | None:
    """What the autoscaler is launching now ({"launching": {node type: count}}), or None where no autoscaler runs
    (a private Ray, a static cluster). Ray's autoscaler reports to the GCS: v1 (`ray up`, KubeRay's default) in the
    key-value store, v2 (`RAY_enable_autoscaler_v2`) as the autoscaling state of the cluster status."""
    from ray.experimental.internal_kv import _internal_kv_get

    with contextlib.suppress(Exception):
        raw = _internal_kv_get(AUTOSCALER_STATUS_KEY)
        report = json.loads(raw) if raw else {}
        if report and time.time() - report.get("time", 0) < AUTOSCALER_FRESH_SECONDS:
            summary = report.get("autoscaler_report") or {}
            launching = dict(summary.get("pending_launches") or {})
            for _, node_type, *_ in summary.get("pending_nodes") or []:
                launching[node_type] = launching.get(node_type, 0) + 1
            return {"launching": launching}
    with contextlib.suppress(Exception):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        if status.stats.autoscaler_version not in (None, "", "0"):
            launching: dict = {}
            for launch in status.pending_launches:
                launching[launch.ray_node_type_name] = launching.get(launch.ray_node_type_name, 0) + launch.count
            for node in status.pending_nodes:
                launching[node.ray_node_type_name] = launching.get(node.ray_node_type_name, 0) + 1
            return {"launching": launching}
    return None


def plan_pool(config: ExtractConfig, num_shards: int, private: bool) -> tuple[PoolPlan, list[str]]:
    """The pool for `num_shards` pending shards, and the lines that say what was chosen and why."""
    run = config.run
    nodes = [node for node in alive_nodes() if node["Resources"].get("CPU", 0) > 0]
    total_gpus = sum(node["Resources"].get("GPU", 0) for node in nodes)
    autoscaler = not private and autoscaler_report() is not None
    gpus = run.gpus_per_actor if run.gpus_per_actor is not None else (1.0 if total_gpus else 0.0)
    if run.max_actors:
        minimum, maximum = min(run.min_actors, run.max_actors), run.max_actors
    else:  # work starts with the first actor ready, as it always did
        maximum = run.actors or (max(1, int(total_gpus // gpus)) if gpus else max(1, len(nodes)))
        minimum = 1
    cpus = run.cpus_per_actor if run.cpus_per_actor is not None else default_cpus(nodes, maximum, gpus, run.max_actors)
    plan = PoolPlan(min(minimum, num_shards), min(maximum, num_shards), float(cpus), float(gpus), bool(run.max_actors))
    seen = (f"{total_gpus:g} GPUs on {len(nodes)} node(s) now" if total_gpus else f"no GPU on {len(nodes)} node(s) now")
    why = "run.max_actors" if run.max_actors else "run.actors" if run.actors else (
        "one per GPU" if gpus else "one per node")
    cluster = "a private local Ray" if private else "an autoscaler runs" if autoscaler else "no autoscaler"
    lines = [f"{plan.describe()} ({why}; {seen}; {cluster})"]
    if not total_gpus and run.gpus_per_actor is None and not private:
        lines.append("running on CPUs: to use GPU nodes " + ("the autoscaler can add" if autoscaler else "instead")
                     + ", set run.gpus_per_actor: 1 and run.max_actors: N (up to N GPU actors, added as nodes join)")
    return plan, lines


def default_cpus(nodes: list[dict], count: int, gpus: float, elastic: bool) -> float:
    """A node's cores divided among its actors; 1 for an elastic GPU pool, whose nodes may not exist yet (set
    run.cpus_per_actor to give its decode threads more)."""
    if elastic and gpus:
        return 1.0
    smallest_node = min((node["Resources"]["CPU"] for node in nodes), default=1)
    actors_per_node = 1 if elastic else max(1, -(-count // max(1, len(nodes))))
    return max(1.0, smallest_node // actors_per_node)


def request_capacity(plan: PoolPlan, num_actors: int) -> None:
    """Ask the autoscaler for `num_actors` bundles of the actor's shape (0 clears the request)."""
    from ray.autoscaler.sdk import request_resources

    with contextlib.suppress(Exception):  # a cluster without an autoscaler ignores the request
        request_resources(bundles=[plan.bundle()] * num_actors)


class PlacementWatch:
    """Watches a pool that is not placed yet: refuses a shape the cluster can never hold (ConfigError, exit 2),
    says every 30 s what it waits for, and gives up after `run.start_timeout` (PoolTimeout, exit 3)."""

    def __init__(self, plan: PoolPlan, config: ExtractConfig, private: bool, say):
        self.plan = plan
        self.timeout = config.run.start_timeout
        self.private = private
        self.say = say
        self.waiting_since: float | None = None
        self.last_line = 0.0
        self.launch_seen = False

    def check(self, num_ready: int, needed: int) -> None:
        """Called on every turn of the scheduling loop with how many actors are ready and how many must be."""
        now = time.monotonic()
        if num_ready >= needed:
            self.waiting_since = None
            return
        if self.waiting_since is None:
            self.waiting_since = self.last_line = now
        nodes = alive_nodes()
        if any(fits(node["Resources"], self.plan) for node in nodes):
            self.fail_after_timeout(now, num_ready, needed, "")
            return
        report = None if self.private else autoscaler_report()
        launching = pending_launches(report)
        self.launch_seen = self.launch_seen or bool(launching)
        if report is None or (not self.launch_seen and now - self.waiting_since > AUTOSCALER_VERDICT_SECONDS):
            raise ConfigError(infeasible_message(self.plan, nodes, report is not None))
        self.fail_after_timeout(now, num_ready, needed, f"; the autoscaler is launching {launching or 'nothing now'}")

    def fail_after_timeout(self, now: float, num_ready: int, needed: int, autoscaler: str) -> None:
        waited = now - self.waiting_since
        demand = f"{needed - num_ready} more actor(s) of {shape_text(self.plan)}"
        if waited > self.timeout:
            raise PoolTimeout(f"{num_ready} of the {needed} actor(s) needed were placed and ready within "
                              f"run.start_timeout ({self.timeout:g} s); pending demand: {demand}{autoscaler}. "
                              "Committed shards are kept: run again to resume")
        if now - self.last_line >= WAIT_LINE_SECONDS:
            self.last_line = now
            self.say(f"waiting {waited:.0f} s for {demand} to be placed and load the model{autoscaler}")


def pending_launches(report: dict | None) -> dict:
    """Node types the autoscaler is launching or waiting to join, with counts."""
    return report["launching"] if report else {}


def shape_text(plan: PoolPlan) -> str:
    return f"{plan.num_cpus:g} CPUs" + (f" + {plan.num_gpus:g} GPUs" if plan.num_gpus else "")


def infeasible_message(plan: PoolPlan, nodes: list[dict], autoscaler: bool) -> str:
    largest = max(nodes, key=lambda node: (node["Resources"].get("GPU", 0), node["Resources"].get("CPU", 0)),
                  default={"Resources": {}})["Resources"]
    has = (f"its largest node has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs"
           + (", and its autoscaler launched no node for it" if autoscaler else ", and no autoscaler adds nodes"))
    key = "run.gpus_per_actor" if plan.num_gpus > largest.get("GPU", 0) else "run.cpus_per_actor"
    return (f"{key}: each actor asks for {shape_text(plan)}, which no node of this cluster can hold ({has}); "
            f"lower {key}, or run on a cluster with such nodes")

