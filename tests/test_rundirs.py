"""Lock files that remove themselves (xdpnet/rundirs.py): exclusion holds
even when every holder deletes the lock file and its directory on release."""

from __future__ import annotations

import multiprocessing
import os

from xdpnet.rundirs import flocked, remove_empty


def _bump(locks: str, counter: str, n: int) -> None:
    for _ in range(n):
        with flocked(locks, "x.lock", unused=lambda: True, up_to=locks):
            with open(counter) as f:
                v = int(f.read())
            with open(counter, "w") as f:
                f.write(str(v + 1))


def test_self_removing_lock_still_excludes(tmp_path):
    locks = str(tmp_path / "run" / "locks")
    counter = str(tmp_path / "counter")
    with open(counter, "w") as f:
        f.write("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(locks, counter, 300)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open(counter) as f:
        assert int(f.read()) == 1200            # no update lost: never two holders
    assert not os.path.exists(locks)            # the last holder removed file and directory


def test_lock_kept_while_used(tmp_path):
    d = str(tmp_path / "locks")
    with flocked(d, "y.lock", unused=lambda: False):
        pass
    assert os.path.exists(os.path.join(d, "y.lock"))


def test_remove_empty_stops_at_a_non_empty_parent(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "keep").write_text("x")
    remove_empty(str(tmp_path / "a" / "b" / "c"), str(tmp_path / "a"))
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "keep").exists()
