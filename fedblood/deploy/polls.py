"""Flower 1.42's fixed waits, shortened where a fedblood process runs Flower's code.

Flower waits on fixed sleeps where it could be told: a SuperNode sleeps 3 s after every pull
that found no message, and 0.5 s at a time while a reply or its arrays are not ready
(``flwr/supernode/start_client_internal.py``); and whoever pulls a message's arrays (a
SuperNode pulling a request, the ServerApp pulling a reply) backs off 1 s, then 2 s, ... when
the message is listed before its sender has pushed every array (``pull_objects``), which a
fast pull always meets. Measured on configs/wbc.py (docs/performance.md), these waits were
most of a deployed round.

:func:`shorten` caps them at ``seconds`` in this process: the sleeps of
``start_client_internal`` (through the ``time`` it holds, nothing else) and the first back-off
of ``pull_objects`` (its later ones still double, up to Flower's 10 s cap, so a slow sender is
not hammered). Each change is made only where Flower 1.42's code is as expected; otherwise
that wait is left as it is and the change is reported as not made.
"""

import time

POLL_S = 0.1


class ShortSleep:
  """The ``time`` module with ``sleep`` capped at ``cap`` seconds (everything else as is)."""

  def __init__(self, cap: float):
    self.cap = cap

  def __getattr__(self, name):
    return getattr(time, name)

  def sleep(self, seconds: float) -> None:
    time.sleep(min(seconds, self.cap))


def replace(module, name: str, expected, replacement) -> bool:
  """``module.<name> = replacement`` if it is ``expected`` (what Flower 1.42 holds there);
  False, and nothing changed, otherwise. fedblood changes Flower's code this way only."""
  if getattr(module, name, None) is not expected:
    return False
  setattr(module, name, replacement)
  return True


def cap_sleeps(module, cap: float) -> bool:
  """``module``'s ``time.sleep`` calls capped at ``cap`` s; False (unchanged) if it holds no
  ``time`` module."""
  held = getattr(module, 'time', None)
  if isinstance(held, ShortSleep):
    held.cap = cap
    return True
  return replace(module, 'time', time, ShortSleep(cap))


def cap_first_backoff(cap: float) -> bool:
  """``pull_objects``' first back-off at most ``cap`` s in this process (all its callers);
  False (unchanged) if it takes no ``initial_backoff``."""
  from flwr.supercore.inflatable import inflatable_utils  # pylint: disable=g-import-not-at-top
  defaults = inflatable_utils.pull_objects.__kwdefaults__ or {}
  if 'initial_backoff' not in defaults:
    return False
  defaults['initial_backoff'] = min(defaults['initial_backoff'], cap)
  return True


def shorten(seconds: float = POLL_S, supernode: bool = False) -> list[str]:
  """Caps Flower's waits at ``seconds`` in this process (the SuperNode's loop too when
  ``supernode``); returns the names of the waits left as they were."""
  missed = [] if cap_first_backoff(seconds) else ['pull_objects initial_backoff']
  if supernode:
    from flwr.supernode import start_client_internal  # pylint: disable=g-import-not-at-top
    if not cap_sleeps(start_client_internal, seconds):
      missed.append('start_client_internal sleeps')
  return missed
