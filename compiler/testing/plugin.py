"""fxopt's pytest plugin (registered through the `pytest11` entry point).

- ``--fxopt-examples N`` makes every `check_pass` run N examples, whatever its test asks for
  (the slow suite runs ``pytest -m slow --fxopt-examples 1000``).
- The fixture ``fxopt_check`` is `check_pass`, and records each run's summary in the test's
  ``user_properties`` (shown in JUnit XML reports)::

      def test_my_pass(fxopt_check):
          fxopt_check(my_pass, min_fired=1)
"""

from __future__ import annotations

import pytest

from fxopt import testing  # its `check` and `check_pass` load on first use: they need hypothesis


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fxopt")
    group.addoption(
        "--fxopt-examples",
        type=int,
        default=None,
        metavar="N",
        help="examples per fxopt.testing.check_pass call, overriding max_examples",
    )


_previous = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    count = config.getoption("fxopt_examples", None)
    if count is not None:
        config.stash[_previous] = testing.check.max_examples_override()
        testing.check.set_max_examples(count)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _previous in config.stash:
        testing.check.set_max_examples(config.stash[_previous])


@pytest.fixture
def fxopt_check(request: pytest.FixtureRequest):
    """`check_pass`, recording each summary in the test's `user_properties`."""

    def run(*args, **kwargs):
        summary = testing.check_pass(*args, **kwargs)
        request.node.user_properties.append(("fxopt_check", str(summary)))
        return summary

    return run
