"""Progress in a log: whole lines at most every LOG_INTERVAL_S seconds, nothing for short work or
in quiet mode (stderr under capsys is not a terminal, as under ``nohup … > log``)."""
import time

from metareason import metrics


def _work(bar, n, pause):
    for _ in range(n):
        time.sleep(pause)
        bar.update(1)
    bar.close()


def test_long_work_in_a_log_prints_whole_lines(capsys, monkeypatch):
    monkeypatch.setattr(metrics, "LOG_INTERVAL_S", 0.05)
    _work(metrics.progress(total=6, desc="critiques"), 6, 0.03)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert len(lines) >= 2 and all(line.startswith("[critiques] ") for line in lines)
    assert lines[-1].startswith("[critiques] 6/6 ")


def test_lines_are_rate_limited(capsys, monkeypatch):
    monkeypatch.setattr(metrics, "LOG_INTERVAL_S", 0.2)
    _work(metrics.progress(total=20, desc="x"), 20, 0.02)  # about 0.4 s of work
    assert 1 <= len(capsys.readouterr().err.splitlines()) <= 4


def test_short_work_prints_nothing(capsys):
    _work(metrics.progress(total=5, desc="fast"), 5, 0.0)
    for _ in metrics.progress(range(5), desc="iterated"):
        pass
    assert capsys.readouterr().err == ""


def test_quiet_prints_nothing(capsys, monkeypatch):
    monkeypatch.setattr(metrics, "LOG_INTERVAL_S", 0.01)
    _work(metrics.progress(total=5, desc="q", quiet=True), 5, 0.03)
    assert capsys.readouterr().err == ""


def test_iterating_a_wrapped_iterable_reports_progress(capsys, monkeypatch):
    monkeypatch.setattr(metrics, "LOG_INTERVAL_S", 0.05)
    seen = [x for x in metrics.progress(range(5), desc="it") if time.sleep(0.03) is None]
    assert seen == list(range(5))
    assert capsys.readouterr().err.splitlines()[-1].startswith("[it] 5/5 ")
