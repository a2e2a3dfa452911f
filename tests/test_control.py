"""The "checkpoint now" side channel on its own (the loop honouring it on Ray: test_train_ray.py;
the controller asking before a stop: tests/orchestrator/test_controller.py)."""

from workers.control import ControlChannel


def test_request_is_pending_until_confirmed(tmp_path):
    channel = ControlChannel(tmp_path)
    assert channel.pending() is None
    request = channel.request_checkpoint("resize to 4 workers")
    assert channel.pending() == request and channel.confirmation(request) is None
    done = channel.confirm(request, step=17)
    assert channel.pending() is None
    assert channel.confirmation(request) == done and (done.step, done.reason) == (17, "resize to 4 workers")


def test_a_newer_request_supersedes_an_older_one(tmp_path):
    channel = ControlChannel(tmp_path)
    first = channel.request_checkpoint("first")
    channel.confirm(first, step=3)
    second = channel.request_checkpoint("second")
    assert channel.pending() == second and channel.confirmation(second) is None
    channel.confirm(second, step=9)
    assert channel.pending() is None and channel.confirmation(first) is None  # one file: the latest answer


def test_unreadable_files_never_fail_the_loop(tmp_path):
    channel = ControlChannel(tmp_path)
    channel.root.mkdir(parents=True)
    (channel.root / "checkpoint_request.json").write_text("{half a req")
    assert channel.pending() is None
    assert not list(channel.root.glob(".*.tmp"))  # writes go through a temp file and a rename

