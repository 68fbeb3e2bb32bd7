"""The CLI's malloc setting (cli.keep_freed_memory): the mmap threshold first, the trim threshold only after it."""

import platform

import pytest

from tokdistill_fast import cli


class FakeLibc:
    """Records mallopt calls; `accepts` says which parameters it takes."""

    def __init__(self, accepts: set[int]):
        self.accepts, self.calls = accepts, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(param in self.accepts)


def test_both_thresholds_are_set_in_order():
    libc = FakeLibc({cli.M_MMAP_THRESHOLD, cli.M_TRIM_THRESHOLD})
    assert cli.keep_freed_memory(libc)
    assert libc.calls == [(cli.M_MMAP_THRESHOLD, cli.KEEP_FREED), (cli.M_TRIM_THRESHOLD, cli.KEEP_FREED)]


def test_trim_threshold_is_left_alone_when_the_mmap_threshold_is_refused():
    """A fixed trim threshold alone turns glibc's adaptive mmap threshold off (8x the page faults, measured)."""
    libc = FakeLibc({cli.M_TRIM_THRESHOLD})
    assert not cli.keep_freed_memory(libc)
    assert libc.calls == [(cli.M_MMAP_THRESHOLD, cli.KEEP_FREED)]


def test_without_mallopt_nothing_happens():
    assert not cli.keep_freed_memory(object())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_both():
    assert cli.keep_freed_memory()
