"""benchmarks/bench_realistic.py runs a whole segment (issue #22 item 5).

With `--turns 16` the timed turns fill a segment, and the engine discards the conversation's
prefix-cache entry after the segment's last turn (the next turn opens a new segment): the
benchmark read the entry after the loop and crashed with KeyError. It now keeps the last entry it
saw. Run on the tiny Qwen3.5 shape so that it takes seconds.
"""

from __future__ import annotations

import pytest

from benchmarks import bench_realistic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_full_16_turn_segment_runs_and_reports_the_cache_entry(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_realistic.main(["--size", "tiny", "--turns", "16", "--reps", "1", "--dtypes", "float32",
                               "--no-write"])
    assert rc == 0
    out = capsys.readouterr().out
    # the entry measured is the one the 15th turn left (the 16th closes the segment)
    assert "prefix cache per conversation, measured (prefix of" in out
    assert "continuing turns 2-16 with the prefix cache" in out
