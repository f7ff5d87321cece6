"""Quiet runs: the known noise of our libraries, switched off where it is made; ``--verbose`` keeps all of it.

Each switch names one library logger or one message, never a level that would hide an error; and
every failure still ends in the CLI's one line and its traceback file (``pipeline/errors.py``):

* transformers / diffusers: verbosity ``error`` (``TRANSFORMERS_VERBOSITY`` / ``DIFFUSERS_VERBOSITY``):
  "`CLIPImageProcessor` requires torchvision", "Cannot initialize model with low cpu memory usage".
  Environment variables, so they reach the Ray workers too: the workers of a local Ray inherit them from
  this process (:func:`ray_init_args` sets them before Ray starts); for a cluster it puts them in the
  job's ``runtime_env``. (Not a ``runtime_env`` locally: every worker start would then wait for Ray's
  runtime-env agent, ~1–2 s per worker process on two cores, all of it start-up.)
* libraries' progress bars (diffusers' "Loading pipeline components...", transformers' "Loading weights",
  hub downloads): ``TQDM_DISABLE`` (tqdm >= 4.66), so that ``run --no-ray`` and ``eval``, which load the
  model in this process, are as quiet as the Ray runner, whose workers never print to the terminal.
  synthgen's own bars (the run's, eval's) pass ``disable=`` explicitly, and a call's argument wins.
* Ray: the "Token authentication is enabled for this Ray cluster" banner of a local Ray; Ray Data's
  "Progress bars disabled" notice; Ray Data's own report of a failed run (its error records: "An
  exception was raised from a task of operator", "Full stack trace", ...), held back while the run
  goes on and dropped when it fails, for the failure reaches the driver as the exception the CLI
  reports once (:func:`ray_data_console`). Driver-side loggers: workers never print to the terminal
  unless ``verbose`` (``log_to_driver``).

Ray's error-level ``core_worker.cc`` line about actor constructor arguments is not logged at all:
the Ray graph creates its actors with ``max_restarts=0`` (``pipeline/graph.py``).

Must not: import Ray, transformers or diffusers (the CLI's bad-input path stays fast), or touch
anything when ``verbose``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

#: environment of the CLI's process and of every Ray worker process
ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
#: driver-side loggers of one known notice each, raised to ERROR
NOTICE_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled ..."
    "ray.data._internal.progress",  # "Progress bars disabled. To enable, set ..."
)


def setup(verbose: bool) -> None:
    """Quiet this process (the CLI's): environment first, before any of the libraries is imported."""
    if verbose:
        return
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_init_args(verbose: bool, local: bool) -> dict:
    """``ray.init`` arguments: Ray's log level, worker output on the terminal only when verbose, the
    workers' environment: for a ``local`` Ray (started by this call) this process's own, set here, which its
    workers inherit; for a cluster, the job's ``runtime_env``."""
    if verbose:
        return {"logging_level": "INFO", "log_to_driver": True}
    if local:
        setup(verbose)  # the CLI has done it already; run_job called from Python has not
        return {"logging_level": "WARNING", "log_to_driver": False}
    return {"logging_level": "WARNING", "log_to_driver": False, "runtime_env": {"env_vars": dict(ENV)}}


class _HoldErrors(logging.Filter):
    """Keeps error records off a handler, for later."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True


@contextmanager
def ray_data_console(verbose: bool) -> Iterator[None]:
    """Ray Data's console during a run (call after ``import ray.data``): no "Progress bars disabled"
    notice, and its error records held back: when the run fails they are Ray Data's report of the
    exception the CLI reports once (they stay in ``ray-data.log`` in the Ray session); when it ends
    well they are printed then."""
    if verbose:
        yield
        return
    logging.getLogger(NOTICE_LOGGERS[1]).setLevel(logging.ERROR)
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    hold = _HoldErrors()
    for handler in handlers:
        handler.addFilter(hold)
    ok = False
    try:
        yield
        ok = True
    finally:
        for handler in handlers:
            handler.removeFilter(hold)
            for record in hold.records if ok else ():
                handler.handle(record)
