"""The ServerApp's peak RSS over one run (flower.metering.PeakRss): it sees memory held only
inside the block, which ``ru_maxrss`` cannot tell apart from earlier runs in the process."""

from __future__ import annotations

import mmap
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
        # Fresh anonymous pages, every one written: the allocator cannot hand back pages an
        # earlier test freed but kept resident (np.ones could, and RSS then did not grow).
        block = mmap.mmap(-1, 256 * 2**20)
        np.frombuffer(block, dtype=np.uint8)[:] = 1
        inside = current_rss_bytes()
        time.sleep(0.2)
        block.close()
    assert inside is not None and inside >= before + 200 * 2**20
    assert outer.peak >= inside - 16 * 2**20
    with PeakRss(interval=0.01) as later:  # a later block of the same process does not inherit the peak
        time.sleep(0.05)
    assert later.peak < outer.peak - 100 * 2**20
