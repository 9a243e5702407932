"""A multirun job ends only when the DDP ranks it started have (lungseg.ranks): a rank of a
finished job that ends badly no longer kills the sweep in a later job."""

import logging
import subprocess
import sys
import time

import pytest
from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

from lungseg import ranks


class Launcher:
    """What lungseg.ranks reads of Lightning's _SubprocessScriptLauncher."""

    def __init__(self, *scripts: str) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", s]) for s in scripts]


def test_a_rank_that_ended_badly_is_taken_from_lightnings_watch_before_it_kills_the_sweep(
    caplog,
):
    """Lightning's thread watching a job's ranks kills the main process (here a stand-in) when
    one of them has ended with a non-zero status, at its first look, 5 s after it starts
    (here 1 s).
    Was: the main process, gone on to the next job of the sweep, was killed, and that job's
    ranks waited for it until their timeout."""
    sweep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        launcher = Launcher("import sys; sys.exit(3)")
        ranks.remember(launcher)
        # as the launcher does in main_pid's process
        watch = _launch_process_observer_for(launcher.procs, sweep.pid)
        with caplog.at_level(logging.WARNING, logger="lungseg.ranks"):
            ranks.end_ranks_of_this_job()
        assert "process 1 of this job ended with status 3" in caplog.text
        assert "train_ddp_process_1.log" in caplog.text
        watch.join(timeout=15)
        assert not watch.is_alive()  # it found no process left to watch, and ended
        with pytest.raises(subprocess.TimeoutExpired):  # and killed nothing
            sweep.wait(timeout=1)
    finally:
        sweep.kill()
        sweep.wait()


def _launch_process_observer_for(procs: list, main_pid: int):
    """Lightning's own watching thread, as _launch_process_observer starts it (same list of
    processes), but watching over ``main_pid`` and looking every second, not every 5 s."""
    watch = _ChildProcessObserver(main_pid=main_pid, child_processes=procs, sleep_period=1)
    watch.start()
    return watch


def test_a_rank_that_ended_badly_while_another_is_waited_for_kills_nothing(caplog):
    """Rank 1 ends badly at once, rank 2 takes longer than the watching thread's first look
    (5 s; here 1 s) to end: the ranks were taken from it only after both had been waited for, so it
    saw rank 1's status and killed the sweep (found by a review)."""
    sweep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        launcher = Launcher("import sys; sys.exit(3)", "import time; time.sleep(2.5)")
        ranks.remember(launcher)
        watch = _launch_process_observer_for(launcher.procs, sweep.pid)
        with caplog.at_level(logging.WARNING, logger="lungseg.ranks"):
            ranks.end_ranks_of_this_job(grace=20)
        assert "process 1 of this job ended with status 3" in caplog.text
        watch.join(timeout=15)
        assert not watch.is_alive()
        with pytest.raises(subprocess.TimeoutExpired):  # the sweep lives on
            sweep.wait(timeout=1)
    finally:
        sweep.kill()
        sweep.wait()


def test_a_rank_still_running_after_its_job_is_killed(caplog):
    launcher = Launcher("import time; time.sleep(60)")
    ranks.remember(launcher)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lungseg.ranks"):
        ranks.end_ranks_of_this_job(grace=0.5)
    assert time.monotonic() - start < 10
    assert "process 1 of this job had not ended 0.5 s after the job did: killed" in caplog.text
    assert launcher.procs == []


def test_ranks_that_ended_well_end_the_job_without_a_word(caplog):
    launcher = Launcher("pass", "pass")
    procs = list(launcher.procs)
    ranks.remember(launcher)
    ranks.remember(object())  # a Trainer on one device has no launcher of processes
    with caplog.at_level(logging.WARNING, logger="lungseg.ranks"):
        ranks.end_ranks_of_this_job()
    assert caplog.text == ""
    assert [p.returncode for p in procs] == [0, 0] and launcher.procs == []


def test_a_failure_to_leave_the_process_group_still_ends_the_ranks(monkeypatch):
    """train.py's end of a sweep job: the ranks are ended and the launcher's environment
    variables removed even where leaving the process group fails."""
    import os

    import train

    monkeypatch.delenv("MASTER_PORT", raising=False)  # and gone after the test, whatever it does
    launcher = Launcher("pass")
    ranks.remember(launcher)
    monkeypatch.setattr(train, "leave_process_group", lambda: 1 / 0)
    monkeypatch.setattr(train, "HydraConfig", _FakeHydra)
    with pytest.raises(ZeroDivisionError), train.ddp_ranks_in_this_job():
        os.environ["MASTER_PORT"] = "12345"  # as Lightning's launcher sets it
    assert "MASTER_PORT" not in os.environ and launcher.procs == []


class _FakeHydra:
    """What ddp_ranks_in_this_job reads of Hydra's config."""

    @staticmethod
    def get():
        from omegaconf import OmegaConf

        return OmegaConf.create(
            {
                "overrides": {"hydra": [], "task": []},
                "run": {"dir": "x"},
                "runtime": {"output_dir": "x"},
            }
        )
