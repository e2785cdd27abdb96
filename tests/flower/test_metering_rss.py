"""The ServerApp's peak RSS over one run (flower.metering.PeakRss): it sees memory held only
inside the block, which ``ru_maxrss`` cannot tell apart from earlier runs in the process."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from flower_split.flower.metering import PeakRss, current_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="samples /proc/self/statm")
def test_peak_rss_sees_memory_held_inside_the_block_only() -> None:
    before = current_rss_bytes()
    assert before is not None and before > 0
    with PeakRss(interval=0.01) as outer:
        block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
        time.sleep(0.2)
        del block
    assert outer.peak >= before + 200 * 2**20
    with PeakRss(interval=0.01) as later:  # a later block of the same process does not inherit the peak
        time.sleep(0.05)
    assert later.peak < outer.peak - 100 * 2**20
