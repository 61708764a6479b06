"""Shared test set-up.

grain's worker processes read absl flags, so they must be parsed even under pytest. Tests run on
the CPU backend with 8 fake devices so that sharding code paths are exercised.
"""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging as std_logging  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

# The config factory and helpers shared by test modules and child scripts (tests/helpers.py).
from helpers import (  # noqa: E402,F401
    H, MARKET, W, float32_feature_tol, make_config, take, write_split)


@pytest.fixture(autouse=True)
def _logging_state():
  """Every test starts from the logging state the session began with: a test that sets the
  console's log level (console.configure_logging) would otherwise leave absl at WARNING, and
  an INFO record that a later test in the same worker expects would be dropped."""
  root_level = std_logging.getLogger().level
  # The absl logger's own level, NOTSET included: set_verbosity(get_verbosity()) would pin
  # an inherited level.
  absl_level = logging.get_absl_logger().level
  handler = logging.get_absl_handler()
  formatter, filters = handler.python_handler.formatter, list(handler.filters)
  yield
  std_logging.getLogger().setLevel(root_level)
  logging.get_absl_logger().setLevel(absl_level)
  handler.python_handler.setFormatter(formatter)
  for f in list(handler.filters):
    if f not in filters:
      handler.removeFilter(f)
