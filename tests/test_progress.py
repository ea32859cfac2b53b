"""Off a terminal, long work prints a plain line with rate and ETA at least every `every_s`, even while stuck."""
import re
import time

from recogdrive_jax.train.metrics import Progress, track


def test_plain_lines_with_rate_and_eta_and_heartbeat(capsys):
    with Progress(100, desc="work", unit="steps", every_s=0.2, tty=False) as p:
        time.sleep(0.35)  # nothing finished yet (e.g. compiling): the heartbeat still prints
        waiting = capsys.readouterr().out
        for k in range(1, 11):
            time.sleep(0.02)
            p.update(k)
        time.sleep(0.3)  # a slow step: still a line within every_s
        out = capsys.readouterr().out
    assert "[work] 0/100 steps (0%)" in waiting and "waiting for the first" in waiting
    line = [l for l in out.splitlines() if l.startswith("[work] 10/100 steps (10%)")][-1]
    rate = float(re.search(r", ([0-9.e+-]+) steps/s", line).group(1))
    assert 5 < rate < 100, line  # ~9 steps in ~0.2 s
    m = re.search(r"ETA (\d+):(\d\d)", line)
    assert m and 1 <= int(m.group(1)) * 60 + int(m.group(2)) <= 20, line  # 90 steps at ~45/s (loaded CPU: slower)


def test_log_lines_carry_rate_and_eta(capsys):
    p = Progress(50, initial=10, desc="il", every_s=60, tty=False)
    for k in range(11, 21):
        time.sleep(0.01)
        p.update(k)
    p.log(20, "train", {"loss": 0.5})
    p.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[il] step 20/50 train: loss=0.5 (") and "steps/s, ETA 0:0" in out[0]


def test_track_counts_items_and_stays_quiet_when_short(capsys):
    assert list(track(range(5), desc="scenes", unit="scenes", tty=False, every_s=10)) == list(range(5))
    assert capsys.readouterr().out == ""
    items = []
    for x in track(range(3), desc="slow", unit="scenes", tty=False, every_s=0.1):
        time.sleep(0.15)
        items.append(x)
    out = capsys.readouterr().out
    assert items == [0, 1, 2] and "[slow] done: 3/3 scenes (100%)" in out
