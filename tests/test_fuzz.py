"""Hostile files: 1500 seeded mutations of real-layout model files through parsing, `flux2 info`
and loading (tests/fuzzing.py). A longer run: scripts/fuzz.py --mutations N."""

import fuzzing
import pytest

MUTATIONS = 1500


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The base files both tests mutate (the workers only read them; each writes in a folder of its own)."""
    path = tmp_path_factory.mktemp("corpus")
    fuzzing.prepare(path)
    return path


def test_mutated_files_are_refused_cleanly_never_crash_hang_or_blow_up(corpus):
    report = fuzzing.fuzz(corpus, seed=2026, indices=list(range(MUTATIONS)), jobs=2, time_cap=5.0,
                          mem_cap=1 << 30)
    assert report.mutations == MUTATIONS
    assert report.failures == 0, report.summary()
    assert report.refused > MUTATIONS // 2, report.summary()  # the mutations really reach the checks


def test_the_supervisor_reports_hangs_blowups_and_crashes(corpus, monkeypatch):
    # Each failure ends its worker and the next one starts (imports, warm-up): the crash comes last, so
    # the three failures take three workers, each running a clean mutation before its failure.
    monkeypatch.setenv("FUZZ_INJECT", "hang:1,blowup:3,crash:5")
    report = fuzzing.fuzz(corpus, seed=1, indices=list(range(6)), time_cap=2.0, mem_cap=256 << 20)
    assert report.mutations == 6
    assert [h["i"] for h in report.hangs] == [1] and [b["i"] for b in report.blowups] == [3]
    assert [c["i"] for c in report.crashes] == [5] and report.crashes[0]["rc"] < 0  # killed by SIGABRT
    assert report.failures == 3
