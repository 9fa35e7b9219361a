"""Configuration: where the configs live, composing them, and checking them before any work starts.

``compose``: configs and resolvers; ``validate``: a whole command line, cheap checks first;
``checks``: per command; ``ranges``: what each number accepts; ``machine``: what this machine runs.
Every check raises :class:`advpt.errors.UserError` with one line naming the bad value and what is
accepted. Modules inside the package import each other directly, never this one.
"""

from advpt.config.checks import (
    attack_kwargs,
    check_arguments,
    check_attack,
    check_data,
    check_pretrain,
    check_run,
)
from advpt.config.compose import (
    CONF_DIR,
    compose,
    compose_all,
    describe_hydra_error,
    register_resolvers,
    run_stamp,
)
from advpt.config.machine import check_environment, check_trainer_arguments, trainer_arguments
from advpt.config.ranges import RANGES, Range, check_range, parse_number, positive_int
from advpt.config.validate import validate

__all__ = [
    "CONF_DIR",
    "RANGES",
    "Range",
    "attack_kwargs",
    "check_arguments",
    "check_attack",
    "check_data",
    "check_environment",
    "check_pretrain",
    "check_range",
    "check_run",
    "check_trainer_arguments",
    "compose",
    "compose_all",
    "describe_hydra_error",
    "parse_number",
    "positive_int",
    "register_resolvers",
    "run_stamp",
    "trainer_arguments",
    "validate",
]
