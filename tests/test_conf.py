"""One source per default: conf/*.yaml holds every job default, and the config objects hold none."""

import dataclasses

import pytest

from jobs import evaluate, score
from jobs.conf import read_defaults
from jobs.pipeline import PipelineConfig, pipeline_config

PARSERS = {"score": score.build_parser, "evaluate": evaluate.build_parser}
# Flags that choose what to run rather than how: no default to keep anywhere.
NO_DEFAULT = {"help", "conf"}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_its_default_in_yaml_and_every_key_is_a_flag(name):
    parser = PARSERS[name]()
    flags = {action.dest for action in parser._actions} - NO_DEFAULT
    assert set(read_defaults(name)) == flags
    for action in parser._actions:
        if action.dest not in NO_DEFAULT:
            assert parser.get_default(action.dest) == read_defaults(name)[action.dest], action.dest


def test_config_objects_carry_no_defaults_of_their_own():
    for field in dataclasses.fields(PipelineConfig):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_the_pipeline_config_takes_every_field_from_the_flags(name):
    args = PARSERS[name]().parse_args(["--input", "x=y", "--output", "out"])
    config = pipeline_config(args)
    yaml = read_defaults(name)
    for field in dataclasses.fields(PipelineConfig):
        if field.name in yaml:
            assert getattr(config, field.name) == yaml[field.name], field.name
    assert (config.min_actors, config.max_actors) == (yaml["actors"], yaml["actors"])
