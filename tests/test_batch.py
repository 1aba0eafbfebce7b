"""Group commit: what arrives while a batch is on the disk goes in the next one."""

from twisted.internet import task

from exedge.queue.batch import Batcher
from exedge.testing import ManualRun


def recorder(batches):
    def process(items):
        batches.append(list(items))
        return [ValueError(i) if i == "bad" else i.upper() for i in items]
    return process


def test_work_arriving_during_a_batch_goes_together_in_the_next():
    run, batches = ManualRun(), []
    b = Batcher(run, recorder(batches), max_batch=3)
    results = []
    for item in ["a", "b", "c", "d", "e"]:
        b.submit(item).addCallback(results.append)
    assert len(run.jobs) == 1                   # "a" went alone; the rest wait
    run.finish_one()
    run.finish_one()
    run.finish_one()
    assert batches == [["a"], ["b", "c", "d"], ["e"]]
    assert results == ["A", "B", "C", "D", "E"]


def test_one_failed_item_fails_only_itself():
    run, batches = ManualRun(), []
    b = Batcher(run, recorder(batches))
    ok, failed = [], []
    b.submit("x")
    for item in ("y", "bad", "z"):
        b.submit(item).addCallbacks(ok.append, lambda f: failed.append(f.value))
    run.finish_one()
    run.finish_one()
    assert ok == ["Y", "Z"] and [str(e) for e in failed] == ["bad"]


def test_background_batch_waits_for_receiving_but_never_more_than_max_wait():
    clock = task.Clock()
    run_fg, run_bg, fg_batches, bg_batches = ManualRun(), ManualRun(), [], []
    receiving = Batcher(run_fg, recorder(fg_batches))
    delivery = Batcher(run_bg, recorder(bg_batches), defer_to=receiving, max_wait=0.25, clock=clock)

    receiving.submit("commit1")
    delivery.submit("deliver1")
    assert run_bg.jobs == []                    # receiving is on the disk: wait
    run_fg.finish_one()                         # receiving idle: delivery goes now
    assert len(run_bg.jobs) == 1
    run_bg.finish_one()
    assert bg_batches == [["deliver1"]]

    # receiving stays busy: delivery still runs once max_wait has passed
    receiving.submit("commit2")
    delivery.submit("deliver2")
    delivery.submit("deliver3")
    clock.advance(0.24)
    assert run_bg.jobs == []
    clock.advance(0.02)
    assert len(run_bg.jobs) == 1
    run_bg.finish_one()
    assert bg_batches[-1] == ["deliver2", "deliver3"]
    assert not clock.getDelayedCalls()


def test_gathered_work_waits_for_enough_items_or_for_gather_wait():
    clock = task.Clock()
    run, batches = ManualRun(), []
    removals = Batcher(run, recorder(batches), clock=clock, gather=3, gather_wait=0.1)
    removals.submit("a")
    removals.submit("b")
    assert run.jobs == []                       # two of three: wait for more
    removals.submit("c")
    assert len(run.jobs) == 1                   # three: go now
    run.finish_one()
    assert batches == [["a", "b", "c"]] and not clock.getDelayedCalls()

    removals.submit("d")
    clock.advance(0.09)
    assert run.jobs == []
    clock.advance(0.02)                         # nobody else came: it goes alone after gather_wait
    assert len(run.jobs) == 1
    run.finish_one()
    assert batches[-1] == ["d"] and not clock.getDelayedCalls()


def test_flush_starts_what_waits_and_fires_once_it_is_done():
    clock = task.Clock()
    run, batches = ManualRun(), []
    receiving = Batcher(ManualRun(), recorder([]))
    removals = Batcher(run, recorder(batches), defer_to=receiving, clock=clock, gather=32, gather_wait=0.1)
    assert removals.flush().called                # nothing waits: at once
    removals.submit("a")
    removals.submit("b")
    receiving.submit("commit")                  # receiving on the disk would hold them too
    done = removals.flush()
    assert len(run.jobs) == 1 and not done.called
    removals.submit("c")                        # what comes meanwhile goes in the flush too
    run.finish_one()
    assert not done.called and len(run.jobs) == 1
    run.finish_one()
    assert done.called and batches == [["a", "b"], ["c"]]
    assert not clock.getDelayedCalls()


def test_without_a_clock_nothing_is_gathered():
    run, batches = ManualRun(), []
    b = Batcher(run, recorder(batches), gather=32, gather_wait=0.1)
    b.submit("a")
    assert len(run.jobs) == 1


def test_receiving_going_idle_does_not_restart_the_wait_for_more():
    """Commits come and go while removals gather: they still start gather_wait after they could have."""
    clock = task.Clock()
    run_fg, run_bg, batches = ManualRun(), ManualRun(), []
    receiving = Batcher(run_fg, recorder([]))
    removals = Batcher(run_bg, recorder(batches), defer_to=receiving, clock=clock, gather=32, gather_wait=0.1)
    removals.submit("a")
    for _ in range(5):                          # a commit every 30 ms
        clock.advance(0.03)
        receiving.submit("commit")
        run_fg.finish_one()
    assert len(run_bg.jobs) == 1                # at 0.1 s, not 0.1 s after the last commit
    run_bg.finish_one()
    assert batches == [["a"]]
