"""One source per default: conf/*.yaml holds every job default, and the config objects hold none."""

import dataclasses

import pytest
import yaml

from emotion.preprocess import DEFAULT_MAX_PIXELS
from emotion.training.config import RunOptions, TrainConfig
from jobs import calibrate, ensemble, evaluate, export, quantize, score, train
from jobs.conf import CONF_DIR, read_defaults
from jobs.pipeline import PipelineConfig, pipeline_config
from serve.app import Settings

PARSERS = {
    "score": score.build_parser,
    "evaluate": evaluate.build_parser,
    "train": train.build_parser,
    "export": export.build_parser,
    "ensemble": ensemble.build_parser,
    "calibrate": calibrate.build_parser,
    "quantize": quantize.build_parser,
}
PIPELINES = ("score", "evaluate")
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


@pytest.mark.parametrize("config", [PipelineConfig, TrainConfig, RunOptions, Settings])
def test_config_objects_carry_no_defaults_of_their_own(config):
    for field in dataclasses.fields(config):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name


def test_serve_yaml_sets_every_setting_and_nothing_else():
    app = yaml.safe_load((CONF_DIR / "serve.yaml").read_text())["applications"][0]
    assert set(app["args"]) == {field.name for field in dataclasses.fields(Settings)}


@pytest.mark.parametrize("name", PIPELINES)
def test_the_pipeline_config_takes_every_field_from_the_flags(name):
    args = PARSERS[name]().parse_args(["--input", "x=y", "--output", "out"])
    config = pipeline_config(args)
    yaml = read_defaults(name)
    for field in dataclasses.fields(PipelineConfig):
        if field.name in yaml:
            assert getattr(config, field.name) == yaml[field.name], field.name
    assert (config.min_actors, config.max_actors) == (yaml["actors"], yaml["actors"])


@pytest.mark.parametrize("name", PIPELINES)
def test_the_jobs_and_the_library_refuse_the_same_image_size(name):
    # The Predictor's keyword default serves direct Python callers; a job must not refuse
    # images that the same code called directly would accept, or the reverse.
    assert read_defaults(name)["max_pixels"] == DEFAULT_MAX_PIXELS
