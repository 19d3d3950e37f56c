"""gptlab.RunSlots: the one place tracking sinks keep a run's writer between hooks."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gptlab


def test_slots_hold_one_value_per_run_and_close_what_a_switched_off_run_left():
    closed = []

    def close(value):
        closed.append(value)
        if value == "broken":
            raise RuntimeError("already reported")

    slots = gptlab.RunSlots(close=close)
    a, b = SimpleNamespace(dir=Path("r/a")), SimpleNamespace(dir=Path("r/b"))
    assert slots.put(a, "broken") == "broken" and slots.get(a) == "broken" and slots.get(b) is None
    slots.put(b, "left open")
    slots.close_stale()  # a failing close is ignored, and every stale value is closed
    assert closed == ["broken", "left open"] and slots.get(a) is None and slots.get(b) is None
    slots.put(a, "writer")
    assert slots.pop(a) == "writer" and slots.pop(a) is None and closed == ["broken", "left open"]
