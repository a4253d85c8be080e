"""Records change state only through ``records.advance``, along their transition tables."""

from __future__ import annotations

import subprocess

import pytest

from headrace.exceptions import InternalError
from headrace.runtime.procs.records import (ActorRecord, ActorState, Proc, ProcState, TaskRecord,
                                      TaskState, advance)


def _task() -> TaskRecord:
    return TaskRecord("t1", "f", [], None, {})


def test_a_task_goes_waiting_queued_sent_done_and_back_to_queued_on_a_retry() -> None:
    task = _task()
    for state in (TaskState.QUEUED, TaskState.SENT, TaskState.QUEUED, TaskState.SENT,
                  TaskState.DONE, TaskState.DONE):       # the same state again: a no-op
        advance(task, state)
        assert task.state is state
    with pytest.raises(InternalError, match="TaskRecord .*DONE -> QUEUED is not allowed"):
        advance(task, TaskState.QUEUED)
    assert task.state is TaskState.DONE


def test_procs_and_actors_follow_their_tables() -> None:
    popen = subprocess.Popen(["true"])
    popen.wait()
    proc = Proc("w1", "actor", "A", popen)
    with pytest.raises(InternalError, match="^Proc A: STARTING -> DONE is not allowed"):
        advance(proc, TaskState.DONE)           # another kind's state is never allowed
    advance(proc, ProcState.READY)
    advance(proc, ProcState.DEAD)
    with pytest.raises(InternalError, match="DEAD -> READY"):
        advance(proc, ProcState.READY)
    actor = ActorRecord("a1", None, "A", None, None, {}, max_concurrency=1, num_cpus=0,
                        max_restarts=1)
    for state in (ActorState.ALIVE, ActorState.STARTING, ActorState.ALIVE, ActorState.DEAD):
        advance(actor, state)                   # ALIVE -> STARTING: a restart
    with pytest.raises(InternalError, match="ActorRecord A.*DEAD -> ALIVE"):
        advance(actor, ActorState.ALIVE)
