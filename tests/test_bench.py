"""The benchmark's measuring pieces (not timings: those are figures, never assertions)."""

import pytest

from pipeline.bench import plan_memory


@pytest.mark.slow
def test_planning_a_million_entry_manifest_stays_within_one_gib():
    memory = plan_memory(1_000_000)
    assert memory["entries"] == 1_000_000
    assert memory["peak_rss_bytes"] < 2**30, f"peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB"
