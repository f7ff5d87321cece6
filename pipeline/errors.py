"""One error path: whatever a command raised, through Ray's wrappers, to one stderr line and an exit code.

* :func:`in_stage` tags an exception raised inside a stage (constructor or call) with the stage's
  name, the phase and the batch's sample keys. The tag is an attribute, so it travels with the
  pickled exception from a Ray worker to the driver.
* :func:`unwrap` finds the original exception behind Ray's wrappers: ``RayTaskError.cause``, and
  the creation task's error that an ``ActorDiedError`` keeps in ``args[0]`` when the actor died in
  its constructor (``actor_init_failed``).
* :func:`exit_code`: 2 for what a rerun repeats (our ``UsageError``s; ValueError / TypeError /
  LookupError raised by a stage, and OSError / ImportError raised while a stage is constructed,
  e.g. a model that does not load); 130 for an interrupt, 143 for SIGTERM; 1 for the rest, transient
  failures included (a worker killed by the OOM killer, a lost node), for which rerunning resumes.
* :func:`transient`: whether a failure is the cluster's (a lost node, actor, worker or object), which the
  runner recovers from inside one run (``retries``) as a person's rerun would.
* :func:`report` prints ``synthgen: error: <Type>: <message> (stage <name>, samples <keys>)``, ANSI
  escapes stripped, and writes the full traceback (the worker's included) to a log file under
  ``$TMPDIR/synthgen/`` that the line names. ``--verbose`` prints the traceback on stderr as well.
* :func:`auth_error`: the hint for a cluster that uses Ray token authentication (run and submit).

Limits: an exception Ray cannot pickle reaches the driver as text only (then the type and message
are read from the traceback text); a worker that dies without raising (``os._exit``, a signal, the
OOM killer) leaves Ray's ``ActorDiedError``, named after its operator. Must not import Ray (the
bad-input path of the CLI stays fast) nor hide anything from the log file.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from .spec import UsageError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, an autoscaler, ``kill``): handled like Ctrl-C (committed shards kept, Ray shut
    down, one line), exit 143. A KeyboardInterrupt so that no ``except Exception`` swallows it."""


#: set by the SIGTERM handler: a raise that lands where Python ignores exceptions (a finalizer, a logging
#: callback) is raised again at the runner's next check (:func:`check_terminated`)
TERMINATING: list[int] = []


def _terminate(signum: int, frame: Any) -> None:
    TERMINATING.append(signum)
    raise Terminated(f"signal {signum}")


def check_terminated() -> None:
    """Raise Terminated if SIGTERM arrived (the runner calls this between batches and shards)."""
    if TERMINATING:
        raise Terminated(f"signal {TERMINATING[0]}")


def terminated(exc: BaseException) -> bool:
    """Whether ``exc`` is how SIGTERM ended the command: a :class:`Terminated`, or any KeyboardInterrupt once the
    handler has run (a library that catches the interrupt and raises a KeyboardInterrupt of its own, as Ray's
    waits can, must not turn a SIGTERM into a Ctrl-C)."""
    return isinstance(exc, Terminated) or (isinstance(exc, KeyboardInterrupt) and bool(TERMINATING))


def on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (again after ``ray.init``, which installs
    its own handler: ``sys.exit`` and then the core worker's native stack dump)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        sys.unraisablehook = _unraisable


def _unraisable(unraisable: Any) -> None:
    """A Terminated raised where Python cannot raise it (an at-fork or finalizer callback) is not printed: the
    runner raises it again at its next check. Anything else goes to Python's own hook."""
    if not isinstance(unraisable.exc_value, Terminated):
        sys.__unraisablehook__(unraisable)


#: Ray's failures of a process, a node or an object (not of the job's code): what a recovery, like a rerun,
#: does not meet again
_TRANSIENT = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError", "ObjectLostError", "WorkerCrashedError",
              "LocalRayletDiedError", "RaySystemError", "ObjectFetchTimedOutError", "OutOfMemoryError",
              "NodeLostError")  # the last: pipeline/graph.py's node watch


def transient(exc: BaseException) -> bool:
    """Whether a failure is the cluster's: a worker, actor, node or object lost (an actor whose constructor
    raised is the job's: a model that does not load fails the same way again)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if _is(e, "RayActorError") and getattr(e, "actor_init_failed", False):
            return False
        if any(_is(e, name) for name in _TRANSIENT):
            return True
        stack += [_inner(e), e.__cause__, e.__context__]
    return False

#: the attribute :func:`in_stage` sets: {"stage", "phase", "samples", "message"}
WHERE = "synthgen_where"
#: the attribute the Ray runner sets on a failure: {Ray operator (UDF) name: our operator name}
OPERATORS = "synthgen_operators"

#: raised by a stage's constructor, these repeat on a rerun (bad model path or files, bad config; torch's
#: RuntimeError for weights that do not fit the model's config; not its OutOfMemoryError)
PERMANENT_IN_INIT = (ValueError, TypeError, LookupError, OSError, ImportError, NotImplementedError, RuntimeError)
#: raised while a stage processes a batch: the same batch gives the same error again
PERMANENT_IN_CALL = (ValueError, TypeError, LookupError, NotImplementedError, FileNotFoundError, PermissionError,
                     IsADirectoryError, NotADirectoryError)

RESUME = "committed shards are kept; rerun the same command to resume"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RAY_OPERATOR = re.compile(r"MapBatches\((\w+)\)")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.*)$")
_WORKER_EXIT = re.compile(r"Worker exit type: (\w+) Worker exit detail: ([^.]*)")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def auth_error(address: str, reason: str) -> UsageError:
    """The one hint for a Ray cluster that refused us for want of its token (``run --address``, ``submit``)."""
    return UsageError(f"{address}: {reason}; the cluster uses Ray token authentication: export RAY_AUTH_MODE=token "
                      "(and RAY_AUTH_TOKEN, or the token in ~/.ray/auth_token)")


def _samples(batch: Mapping[str, Any] | None) -> str:
    """'key' or 'first..last' of the batch's sample keys (indices before sampling has named them)."""
    if not batch:
        return ""
    values = batch.get("key") if "key" in batch else batch.get("index")
    try:
        items = [str(v) for v in values]
    except TypeError:
        return ""
    if not items:
        return ""
    return items[0] if len(items) == 1 else f"{items[0]}..{items[-1]}"


@contextmanager
def in_stage(stage: str, phase: str, batch: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Tag an exception raised in the block with the stage, the phase ("init" or "call") and the samples.

    The innermost tag wins (a stage calling another keeps the first); the message is kept as raised,
    before Ray Data appends its retry advice to it.
    """
    try:
        yield
    except Exception as e:
        if getattr(e, WHERE, None) is None:
            try:
                setattr(e, WHERE, {"stage": stage, "phase": phase, "samples": _samples(batch), "message": str(e)})
            except Exception:  # an exception type that refuses attributes: left untagged
                pass
        raise


def _is(exc: BaseException, name: str) -> bool:
    """isinstance by class name (Ray's exception classes without importing Ray)."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _inner(exc: BaseException) -> BaseException | None:
    if _is(exc, "RayTaskError"):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            return cause
    if _is(exc, "RayActorError") and getattr(exc, "actor_init_failed", False):
        # ActorDiedError(cause=RayTaskError of the creation task): Ray formats its message from the
        # cause and keeps the cause itself only as the constructor argument
        for arg in exc.args:
            if isinstance(arg, BaseException):
                return arg
    return None


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (``exc`` itself when there are none)."""
    seen = {id(exc)}
    while (inner := _inner(exc)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def where(exc: BaseException) -> dict[str, str]:
    """The tag of the original exception, else the stage of the Ray operator a dead worker ran (or {})."""
    tag = getattr(unwrap(exc), WHERE, None)
    if isinstance(tag, dict):
        return tag
    operators = getattr(exc, OPERATORS, None) or {}
    for name in _RAY_OPERATOR.findall(strip_ansi(str(exc))):
        if name in operators:
            return {"stage": operators[name]}
    return {}


def exit_code(exc: BaseException) -> int:
    """2: a rerun repeats it (fix the input); 130: interrupted; 1: anything else (rerun resumes)."""
    if terminated(exc):
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    original = unwrap(exc)
    if isinstance(original, UsageError):
        return EXIT_BAD_INPUT
    tag = getattr(original, WHERE, None)
    if isinstance(tag, dict):
        permanent = PERMANENT_IN_INIT if tag.get("phase") == "init" else PERMANENT_IN_CALL
        if isinstance(original, permanent) and not _is(original, "OutOfMemoryError"):
            return EXIT_BAD_INPUT
    return EXIT_FAILED


def _first_line(text: str) -> str:
    lines = [line.strip() for line in strip_ansi(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def summary(exc: BaseException) -> tuple[str, str]:
    """(type name, one-line message) of the original exception."""
    original = unwrap(exc)
    tag = getattr(original, WHERE, None)
    message = tag["message"] if isinstance(tag, dict) else str(original)
    if _is(original, "RayActorError") and (exit_ := _WORKER_EXIT.search(str(original))):
        # a worker that died without raising: how it ended (the log has Ray's list of likely causes)
        return type(original).__name__, f"{_first_line(message)} (worker exit {exit_[1]}: {exit_[2].strip()})"
    if _is(original, "RayError"):
        # a wrapper Ray could not see through (an unpicklable cause, Ray Data's UserCodeException):
        # the original's type and message are the first exception line of the worker's traceback
        for line in strip_ansi(str(original)).splitlines():
            match = _EXCEPTION_LINE.match(line.strip())
            if match and not match.group(1).startswith("ray."):
                return match.group(1).rsplit(".", 1)[-1], match.group(2).strip()
    return type(original).__name__, _first_line(message)


def log_dir() -> Path:
    return Path(tempfile.gettempdir()) / "synthgen"


def write_log(exc: BaseException, argv: list[str]) -> Path | None:
    """The full traceback (Ray's worker traceback included) in a new file under :func:`log_dir`."""
    original = unwrap(exc)
    parts = [f"command: synthgen {' '.join(argv)}\n", f"time: {datetime.now().isoformat(timespec='seconds')}\n",
             f"exit code: {exit_code(exc)}\n\n", *traceback.format_exception(exc)]
    if original is not exc:
        parts += ["\nthe original exception, unwrapped:\n", *traceback.format_exception(original)]
    try:
        log_dir().mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{datetime.now():%Y%m%d-%H%M%S}-", suffix=".log", dir=log_dir())
        with os.fdopen(fd, "w") as f:
            f.write(strip_ansi("".join(parts)))
        return Path(name)
    except OSError:
        return None


def report(exc: BaseException, command: str, argv: list[str], verbose: bool = False) -> int:
    """Print the one error line of a failed command (the traceback too when ``verbose``); returns the exit code."""
    code = exit_code(exc)
    if isinstance(exc, KeyboardInterrupt):
        what = "terminated (SIGTERM)" if terminated(exc) else "interrupted"
        print(f"synthgen: {what}; {RESUME}" if command == "run" else f"synthgen: {what}", file=sys.stderr)
        return code
    if verbose:
        traceback.print_exception(exc)
    name, message = summary(exc)
    line = f"synthgen: error: {name}: {message}"
    tag = where(exc)
    if tag.get("stage"):
        line += f" (stage {tag['stage']}" + (f", samples {tag['samples']}" if tag.get("samples") else "") + ")"
    if not isinstance(unwrap(exc), UsageError):  # a UsageError's message is the whole story
        log = write_log(exc, argv)
        if log is not None:
            line += f"; full traceback: {log}"
    if code == EXIT_FAILED and command == "run":
        line += f"; {RESUME}"
    print(line, file=sys.stderr)
    return code
