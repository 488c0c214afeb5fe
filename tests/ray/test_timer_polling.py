"""The driver polls an idle query every 10 ms; for an operator with timers on Ray, the
owners are asked at most every ``TIMER_CHECK_MS`` while the watermark stands still (a
round trip to every actor each poll would keep them busy), at once when it moved or a
batch ran. No Ray needed: the owners are stand-ins that count the questions."""

from __future__ import annotations

from typing import Any

import polars as pl
from stateful_fn_pipeline import SCHEMA, login_alerts

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.plan.nodes import OperatorContext
from microstream.plan.physical import compile as compile_plan
from microstream.runtime.ray.executor import TIMER_CHECK_MS, RemoteTimedOperator, _Owner
from microstream.runtime.ray.wire import Wire


class _Call:
    def __init__(self, owner: _Actor, name: str, args: tuple[Any, ...]) -> None:
        self.owner, self.name, self.args = owner, name, args


class _Method:
    def __init__(self, owner: _Actor, name: str) -> None:
        self.owner, self.name = owner, name

    def remote(self, *args: Any, **kwargs: Any) -> _Call:
        self.owner.asked.append((self.name, args))
        return _Call(self.owner, self.name, args)


class _Actor:
    """A stand-in actor: answers ``timers_due`` with ``due``, ``process_pieces`` with no rows."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, tuple[Any, ...]]] = []
        self.due = False

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


class _Executor:
    fence = "poll.0"  # what the owners would put in their state files' names

    def __init__(self, template: Any) -> None:
        self.template = template

    def gather(self, calls: list[_Call], workers: Any, what: str) -> list[Any]:
        answers: list[Any] = []
        for call in calls:
            if call.name == "timers_due":
                answers.append(call.owner.due)
            else:  # process_pieces: the template's empty output and progress, as Wires, no
                # state written (the test commits nothing)
                _, ctx, _counts, *pieces = call.args
                frames = tuple(piece.frame() for piece in pieces)
                output = self.template.process(frames, ctx)
                late = tuple(Wire.of(frame) for frame in output.late_rows)
                answers.append((Wire.of(output.rows), late, self.template.progress(), None, ()))
        return answers


def test_idle_timer_checks_ask_the_owners_at_most_every_timer_check_ms() -> None:
    plan = login_alerts(ms.MemoryStream(SCHEMA).lazy(), delay="10s").plan
    (stage,) = compile_plan(plan).operators()
    template = stage.node.build_operator(stage.operator_id, Storage("memory://timer-poll/op0"))
    template.use_key_groups(128)
    template.load(None)
    owners = [_Actor(), _Actor()]
    operator = RemoteTimedOperator(
        stage,
        [_Owner(owners[0], 0, 0, 64), _Owner(owners[1], 1, 64, 128)],
        Storage("memory://timer-poll"),
        template,
        _Executor(template),  # type: ignore[arg-type]
        128,
    )

    def questions() -> int:
        return sum(1 for o in owners for name, _ in o.asked if name == "timers_due")

    # Polls every 10 ms for 250 ms, the watermark standing still: asked 3 times.
    assert [operator.timers_due(5, now) for now in range(1000, 1250, 10)] == [False] * 25
    assert questions() == 2 * 3
    assert TIMER_CHECK_MS == 100
    # The watermark moved: asked at once.
    assert operator.timers_due(6, 1250) is False
    assert questions() == 2 * 4
    # A batch ran: asked at once, and an owner with a timer due answers True.
    ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=6, output_mode="append")
    empty = pl.DataFrame(schema=SCHEMA)
    operator.process_routed([(empty,), (empty,)], ctx)
    owners[1].due = True
    assert operator.timers_due(6, 1260) is True
    # While a timer is due, every poll asks (the driver runs a batch at once).
    assert operator.timers_due(6, 1270) is True
    assert questions() == 2 * 6
