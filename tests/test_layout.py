"""Fitting the pool to the cluster: room for reads and writes on every node, survival of a node loss."""

import math

import pytest

from jobs.layout import WRITE_CPUS, LayoutError, Node, alive_nodes, fit_layout
from jobs.pipeline import PipelineConfig
from tests.conftest import pipeline

UNSET = pipeline(min_actors=None, max_actors=None, cpus_per_actor=None, preprocess_cpus=0.5)


def placeable(config: PipelineConfig, nodes: list[Node]) -> bool:
    """Whether every actor fits with one read task and one write beside the actors of each node."""
    room = [n.cpus - config.preprocess_cpus - WRITE_CPUS for n in nodes]
    return sum(math.floor(r / config.cpus_per_actor + 1e-9) for r in room) >= config.max_actors


@pytest.mark.parametrize(("nodes", "actors", "cpus"), [
    ([Node(2, 0)], 2, 0.7),
    ([Node(1, 0), Node(1, 0)], 2, 0.2),
    ([Node(8, 0)] * 4, 32, 0.67),
    ([Node(4, 0), Node(16, 0)], 20, 0.17),
])
def test_unset_pool_is_one_actor_per_cpu_and_survives_losing_any_node(nodes, actors, cpus):
    fitted = fit_layout(UNSET, nodes)
    assert (fitted.min_actors, fitted.max_actors, fitted.cpus_per_actor) == (actors, actors, cpus)
    assert placeable(fitted, nodes)
    for lost in range(len(nodes) if len(nodes) > 1 else 0):
        assert placeable(fitted, nodes[:lost] + nodes[lost + 1:]), f"pool fits after losing node {lost}"


def test_nodes_too_small_for_an_actor_beside_a_read_and_a_write_are_refused():
    with pytest.raises(LayoutError, match=r"nodes of 0.62 CPUs are too small for 1 actor\(s\)"):
        fit_layout(UNSET, [Node(0.62, 0), Node(0.62, 0)])


def test_gpu_pool_is_one_actor_per_gpu():
    config = pipeline(min_actors=None, max_actors=None, cpus_per_actor=None, gpus_per_actor=0.5)
    fitted = fit_layout(config, [Node(8, 1), Node(8, 1)])
    assert (fitted.min_actors, fitted.max_actors) == (4, 4)


def test_a_pool_given_by_hand_that_cannot_fit_is_refused_with_the_arithmetic():
    config = pipeline(min_actors=3, max_actors=3, cpus_per_actor=0.7, preprocess_cpus=0.5)
    with pytest.raises(LayoutError) as error:
        fit_layout(config, [Node(2, 0)])
    assert str(error.value) == (
        "3 actor(s) of 0.7 CPU do not fit beside a read task (0.5 CPU) and a write (0.1 CPU) on nodes of 2 CPUs "
        "(room for 2); lower --actors or --cpus-per-actor, or leave them unset to fit the cluster"
    )
    fitted = fit_layout(pipeline(min_actors=1, max_actors=4, cpus_per_actor=0.7), [Node(2, 0)])
    assert fitted.max_actors == 4, "an autoscaling pool needs only its smallest size to fit"


def test_a_read_task_must_fit_somewhere():
    with pytest.raises(LayoutError, match=r"largest node's 0\.5 CPUs"):
        fit_layout(UNSET, [Node(0.5, 0)])


def test_alive_nodes_reads_ray_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 4.0}},
             {"Alive": True, "Resources": {"memory": 1.0}}]
    assert alive_nodes(nodes) == [Node(2.0, 1.0)]
