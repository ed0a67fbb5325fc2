"""CancelPoll asks the sender at most once per interval, and a seen cancel stays seen."""

from mstriton.serving.cancel_poll import CancelPoll


def test_asks_at_most_once_per_interval_and_remembers_a_cancel():
    now, asked, answer = [0.0], [], [False]

    def is_cancelled():
        asked.append(now[0])
        return answer[0]

    poll = CancelPoll(is_cancelled, interval=0.05, clock=lambda: now[0])
    assert poll() is False and asked == [0.0]
    now[0] = 0.03
    answer[0] = True        # the client cancels between two checks
    assert poll() is False and asked == [0.0]
    now[0] = 0.051
    assert poll() is True and asked == [0.0, 0.051]
    answer[0] = False
    now[0] = 1.0
    assert poll() is True and asked == [0.0, 0.051]  # not asked again
