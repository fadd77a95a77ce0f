"""launch's phase timeline (marketplace/phases.py), as a pure object on a given clock."""

from __future__ import annotations

import pytest

from gpubake.images.marketplace.phases import Timeline


def test_phases_are_timed_in_order_and_never_revisited():
    tl = Timeline(start=100.0)
    assert tl.enter("scheduled", now=100.0) is None
    assert tl.enter("scheduled", now=101.0) is None  # no change
    ended = tl.enter("pulling", now=103.0, pulled=(1_500_000_000, 6_000_000_000))
    assert ended is not None and ended.name == "scheduled" and ended.seconds(999) == 3.0
    assert tl.describe(now=110.0) == "pulling 1.5 GB of 6.0 GB (7 s), 10 s in all"
    tl.enter("pulling", now=111.0, pulled=(3_000_000_000, 6_000_000_000))  # progress, same phase
    tl.enter("booting", now=120.0)
    assert tl.enter("pulling", now=121.0) is None  # a platform that flickers back is not recorded twice
    tl.enter("self-test", now=125.0)
    tl.enter("ready", now=190.0)
    tl.close(now=190.0)
    assert tl.to_list(now=200.0) == [
        {"phase": "scheduled", "start_s": 0.0, "seconds": 3.0},
        {"phase": "pulling", "start_s": 3.0, "seconds": 17.0, "bytes": {"done": 3_000_000_000, "total": 6_000_000_000}},
        {"phase": "booting", "start_s": 20.0, "seconds": 5.0},
        {"phase": "self-test", "start_s": 25.0, "seconds": 65.0},
        {"phase": "ready", "start_s": 90.0, "seconds": 0.0},
    ]


def test_start_phases_and_failure():
    tl = Timeline(start=0.0)
    assert tl.in_start() and tl.describe(now=1.0) == "creating"
    tl.enter("scheduled", now=0.0)
    assert tl.in_start()
    tl.enter("booting", now=5.0)  # a cached image: no pull seen
    assert not tl.in_start()
    tl.enter("failed", now=6.0)  # failed follows any phase
    assert [p["phase"] for p in tl.to_list(now=7.0)] == ["scheduled", "booting", "failed"]
    with pytest.raises(ValueError, match="unknown phase 'running'"):
        tl.enter("running")
