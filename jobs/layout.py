"""Fitting the scoring pipeline's reservations to the cluster it runs on.

Ray places work by reservations, not by load: if the inference actors reserve every CPU of a
node, that node never runs a read or a write again, and a job can wait forever for rows that
cannot be produced or files that cannot be written. So the pool is sized from the cluster at
start: every node keeps room for one read task and one write task beside the actors it may host,
and on a cluster of several nodes the whole pool still fits after any one node is lost (its
actors are restarted elsewhere). A layout given by hand that cannot fit is refused before work.
"""

import math
from dataclasses import dataclass, replace

from jobs.pipeline import PipelineConfig

# Parquet writes are short and mostly I/O: a small reservation lets them run while the actors
# hold the rest, so rows reach storage during the run rather than after it.
WRITE_CPUS = 0.1
# Below this an actor's reservation stops meaning anything; a smaller node is refused instead.
MIN_ACTOR_CPUS = 0.05


class LayoutError(Exception):
    """The pipeline cannot fit on the cluster as asked; the message says why."""


@dataclass(frozen=True)
class Node:
    """What the layout needs of a Ray node: the CPUs and GPUs it offers."""
    cpus: float
    gpus: float


def alive_nodes(nodes: list[dict]) -> list[Node]:
    """Alive nodes with CPUs, from `ray.nodes()`."""
    return [
        Node(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
        for n in nodes
        if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
    ]


def _room(node: Node, config: PipelineConfig) -> float:
    """CPUs a node can give actors once a read task and a write task fit beside them."""
    return node.cpus - config.preprocess_cpus - WRITE_CPUS


def fit_layout(config: PipelineConfig, nodes: list[Node]) -> PipelineConfig:
    """`config` with the pool size and actor CPUs derived where unset (None), checked to fit.

    CPU inference defaults to one single-threaded actor per CPU of the cluster; GPU inference to
    as many actors as the GPUs hold.
    """
    if not nodes:
        raise LayoutError("the cluster has no alive node with CPUs")
    cpus = sorted(n.cpus for n in nodes)
    largest = max(nodes, key=lambda n: n.cpus)
    if _room(largest, config) <= 0:
        raise LayoutError(f"a read task ({config.preprocess_cpus} CPU) and a write ({WRITE_CPUS} CPU) need more "
                          f"than the largest node's {largest.cpus:g} CPUs; lower --preprocess-cpus")
    total_gpus = sum(n.gpus for n in nodes)
    min_actors, max_actors = config.min_actors, config.max_actors
    if max_actors is None:
        if config.gpus_per_actor > 0:
            max_actors = max(1, math.floor(total_gpus / config.gpus_per_actor + 1e-9))
        else:
            max_actors = max(1, math.floor(sum(cpus) + 1e-9))
        min_actors = max_actors
    cpus_per_actor = config.cpus_per_actor
    if cpus_per_actor is None:
        survivors = max(len(nodes) - 1, 1)
        per_node = math.ceil(max_actors / survivors)
        cpus_per_actor = math.floor(100 * min(1.0, _room(min(nodes, key=lambda n: n.cpus), config) / per_node)) / 100
        if cpus_per_actor < MIN_ACTOR_CPUS:
            raise LayoutError(
                f"nodes of {cpus[0]:g} CPUs are too small for {per_node} actor(s) beside a read task "
                f"({config.preprocess_cpus} CPU) and a write ({WRITE_CPUS} CPU); pass --actors and "
                "--cpus-per-actor, or lower --preprocess-cpus"
            )
    fitted = replace(config, min_actors=min_actors, max_actors=max_actors, cpus_per_actor=cpus_per_actor)
    _check_fits(fitted, nodes)
    return fitted


def _check_fits(config: PipelineConfig, nodes: list[Node]) -> None:
    """Refuse a pool whose smallest size cannot be placed with room left for reads and writes."""
    assert config.min_actors is not None and config.cpus_per_actor is not None
    if config.cpus_per_actor > 0:
        slots = sum(max(0, math.floor(_room(n, config) / config.cpus_per_actor + 1e-9)) for n in nodes)
        if slots < config.min_actors:
            shapes = ", ".join(f"{n.cpus:g}" for n in nodes)
            raise LayoutError(
                f"{config.min_actors} actor(s) of {config.cpus_per_actor:g} CPU do not fit beside a read task "
                f"({config.preprocess_cpus} CPU) and a write ({WRITE_CPUS} CPU) on nodes of {shapes} CPUs "
                f"(room for {slots}); lower --actors or --cpus-per-actor, or leave them unset to fit the cluster"
            )
