"""normablate.signals: the one stop flag and stop_on_signals of train() and the sweep (real signals, sent to
this process; handlers are restored afterwards)."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from normablate.signals import STOP, Interrupted, StopRequest, held, interrupt_on_signals, stop_on_signals


def test_a_signal_sets_the_flag_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as request:
        assert signal.getsignal(signal.SIGTERM) is request
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_ctrl_c_gives_up_waiting():
    with stop_on_signals() as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_requested_of_the_outer_flag_carries_into_an_inner_run():
    """A sweep worker (STOP installed) signalled while it sets up a run: the run's own flag starts set."""
    STOP.signum = None
    try:
        with stop_on_signals(STOP):
            STOP.signum = signal.SIGTERM
            with stop_on_signals() as run_request:
                assert run_request is not STOP and run_request.signum == signal.SIGTERM
            assert signal.getsignal(signal.SIGTERM) is STOP
    finally:
        STOP.signum = None


def test_a_stop_requested_of_an_inner_run_is_handed_back_to_the_outer_flag():
    """A run signalled after its last step boundary (its test, say) completes; the worker around it must still stop
    (before this, the signal was lost and the worker claimed the next trial)."""
    STOP.signum = None
    try:
        with stop_on_signals(STOP):
            with stop_on_signals() as run_request:
                os.kill(os.getpid(), signal.SIGTERM)
                assert run_request.signum == signal.SIGTERM and STOP.signum is None
            assert STOP.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is STOP
    finally:
        STOP.signum = None


def test_each_signal_is_counted():
    """The sweep command passes each new SIGTERM on to its workers (supervise.run_workers), so it counts them."""
    with stop_on_signals() as request:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
    assert request.count == 3 and request.signum == signal.SIGTERM


def test_relay_is_due_once_per_new_signal():
    """A supervisor passes each new signal on once; a stop requested before its relay was made is due once at first
    (it was not passed on yet), and nothing is due while no stop is requested."""
    request = StopRequest()
    due = request.relay()
    assert not due()
    request(signal.SIGTERM, None)
    assert due() and not due()
    request(signal.SIGTERM, None)
    request(signal.SIGTERM, None)
    assert due() and not due()  # two signals between checks: one pass-on (a child gets the latest)
    late = request.relay()  # made after a stop was requested: that stop is still due once
    assert late() and not late()
    assert not StopRequest().relay()()


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def body():
        with stop_on_signals() as r:
            seen["request"], seen["handler"] = r, signal.getsignal(signal.SIGTERM)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert isinstance(seen["request"], StopRequest) and seen["request"].signum is None
    assert seen["handler"] is not seen["request"]


def _report_mask(send) -> None:
    send.send(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    send.close()


def test_a_child_started_under_held_starts_with_the_signals_held_and_this_process_gets_its_own():
    """The spawned child inherits the block (a sweep worker or the preflight child: a Ctrl-C while it imports waits
    for its handler). Starting the multiprocessing resource tracker inside the block once cleared it in the child.
    This process's mask comes back, and a signal that came while it was held is then delivered."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_report_mask, args=(send,))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_on_signals() as request:
        with held():
            child.start()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # (to this thread: another thread,
            assert request.signum is None  # held                                pytest-xdist's, might take a kill)
        assert request.signum == signal.SIGTERM  # delivered when the block ended
    send.close()
    try:
        assert receive.poll(60) and receive.recv() == sorted(int(s) for s in (signal.SIGINT, signal.SIGTERM))
    finally:
        child.join(timeout=60)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_interrupt_on_signals_ends_what_is_under_way_and_records_the_stop():
    """Opening a sweep's storage (a server that does not answer) or its preflight (a download) is cut off at once, as
    Ctrl-C; the stop is recorded in the flag, and the outer handler comes back."""
    request = StopRequest()
    with stop_on_signals(request):
        with pytest.raises(Interrupted), interrupt_on_signals(request):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000_000):  # (the handler raises here, at the next bytecode)
                pass
        assert request.signum == signal.SIGTERM and request.count == 1
        assert signal.getsignal(signal.SIGTERM) is request
    assert isinstance(Interrupted(), KeyboardInterrupt)  # every Ctrl-C path handles it (the CLI: exit 130)
