"""ThreadTuner: the decode thread count chosen by the measured step times (runtime/threads.py)."""

from qwen35_lite.runtime.threads import FIRST_PROBE, MAX_INTERVAL, ThreadTuner, candidates


class Machine:
    """A fake clock: a step at n threads takes cost[n] seconds."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.threads, self.log = cost, 0.0, None, []

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads = n

    def run(self, tuner: ThreadTuner, steps: int) -> list[int]:
        for _ in range(steps):
            with tuner.step():
                self.now += self.cost[self.threads]
            self.log.append(self.threads)
        return self.log[-steps:]


def test_candidates_are_the_most_half_and_one():
    assert candidates(16) == [16, 8, 1]
    assert candidates(2) == [2, 1]
    assert candidates(1) == [1]


def test_a_quiet_machine_keeps_the_most_threads_and_probes_less_and_less():
    m = Machine({2: 0.010, 1: 0.018})
    tuner = ThreadTuner(2, clock=m.clock, set_threads=m.set_threads)
    m.run(tuner, 2000)
    assert tuner.current == 2
    assert m.log.count(1) < 0.05 * len(m.log)  # probes cost a few slow steps, backing off
    assert tuner._interval == MAX_INTERVAL


def test_a_busy_machine_moves_to_one_thread_and_back_when_it_calms_down():
    m = Machine({2: 0.200, 1: 0.030})  # the second thread waits for time slices
    tuner = ThreadTuner(2, clock=m.clock, set_threads=m.set_threads)
    m.run(tuner, FIRST_PROBE + 10)
    assert tuner.current == 1
    assert m.run(tuner, 40).count(1) >= 36
    m.cost = {2: 0.010, 1: 0.018}  # the other work ended
    m.run(tuner, 3 * MAX_INTERVAL)
    assert tuner.current == 2


def test_a_sudden_slowdown_probes_at_once():
    m = Machine({2: 0.010, 1: 0.018})
    tuner = ThreadTuner(2, clock=m.clock, set_threads=m.set_threads)
    m.run(tuner, 1000)  # the interval has grown to its longest
    m.cost = {2: 0.300, 1: 0.030}
    assert m.run(tuner, 12)[-1] == 1  # one slow step, a probe, the switch: not MAX_INTERVAL steps later


def test_prefill_runs_at_the_most_threads():
    m = Machine({2: 0.200, 1: 0.030})
    tuner = ThreadTuner(2, clock=m.clock, set_threads=m.set_threads)
    m.run(tuner, 40)
    tuner.for_prefill()
    assert m.threads == 2 and tuner.current == 1


def test_one_slow_step_is_noise_and_does_not_bring_the_probes_back():
    m = Machine({2: 0.010, 1: 0.018})
    tuner = ThreadTuner(2, clock=m.clock, set_threads=m.set_threads)
    m.run(tuner, 1000)
    for _ in range(5):  # a page fault or a collection now and then: one step at 5x
        m.cost = {2: 0.050, 1: 0.090}
        m.run(tuner, 1)
        m.cost = {2: 0.010, 1: 0.018}
        m.run(tuner, 20)
    assert 1 not in m.log[1000:]
    assert tuner._interval == MAX_INTERVAL


def test_prefill_puts_small_experts_on_one_thread_until_the_steps_find_the_machine_quiet(monkeypatch):
    from qwen35_lite.experts import dispatch

    m = Machine({2: 0.010, 1: 0.018})
    tuner = ThreadTuner(2, clock=m.clock, set_threads=m.set_threads)
    tuner.for_prefill()  # nothing measured yet: as if busy
    assert dispatch._one_thread
    m.run(tuner, 3 * FIRST_PROBE)  # a probe found 2 threads faster
    tuner.for_prefill()
    assert not dispatch._one_thread
    m.cost = {2: 0.200, 1: 0.030}  # busy
    m.run(tuner, 40)
    tuner.for_prefill()
    assert dispatch._one_thread
    dispatch.small_experts_on_one_thread(False)  # the default without a tuner (--cpu-threads N)
