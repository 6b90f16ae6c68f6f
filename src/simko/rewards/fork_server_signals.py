"""Imported by the verifier pools' fork server only (``simko.rewards.pool`` lists it in the fork server's preload):
the fork server ignores SIGTERM, so that a scheduler's SIGTERM to every process of a job does not kill it while the
trainer finishes its RL step (new verifier workers are forked from it). It exits when the trainer does (its pipe to
the trainer closes). Importing this module anywhere else would make that process ignore SIGTERM too.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
