from __future__ import annotations

import json

from agent.journal import COMPACT_AFTER_LINES, Journal


def msg(n):
    return {"type": "TASK_STATE_REPORT", "n": n}


def test_pending_reports_survive_a_reopen_in_order(tmp_path):
    j = Journal(tmp_path)
    assert j.open() == []
    for n in range(1, 6):
        j.append(j.next_seq(), msg(n))
    j.ack(1)
    j.ack(3)
    j.close()
    again = Journal(tmp_path)
    assert again.open() == [(2, msg(2)), (4, msg(4)), (5, msg(5))]
    assert again.next_seq() == 6


def test_compacts_when_nothing_is_pending(tmp_path):
    j = Journal(tmp_path)
    j.open()
    for n in range(1, 4):
        j.append(n, msg(n))
    for n in range(1, 4):
        j.ack(n)
    lines = j.path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"format": "drove-agent-report-journal", "version": 1}


def test_compacts_when_large(tmp_path):
    j = Journal(tmp_path)
    j.open()
    j.append(1, msg(1))  # stays pending throughout
    for n in range(2, COMPACT_AFTER_LINES + 10):
        j.append(n, msg(n))
        j.ack(n)
    assert len(j.path.read_text().splitlines()) < COMPACT_AFTER_LINES
    j.close()
    assert Journal(tmp_path).open() == [(1, msg(1))]


def test_torn_last_line_is_ignored(tmp_path):
    j = Journal(tmp_path)
    j.open()
    j.append(1, msg(1))
    j.close()
    with j.path.open("ab") as f:
        f.write(b'{"seq": 2, "msg": {"ty')  # a crash mid-append
    assert Journal(tmp_path).open() == [(1, msg(1))]


def test_corrupt_journal_is_moved_aside(tmp_path):
    (tmp_path / "reports.journal").write_text(
        '{"format": "drove-agent-report-journal", "version": 1}\nGARBAGE\n{"seq": 1, "msg": {}}\n'
    )
    j = Journal(tmp_path)
    assert j.open() == []
    aside = list(tmp_path.glob("reports.journal.corrupt-*"))
    assert len(aside) == 1
    assert "GARBAGE" in aside[0].read_text()
    # and the new journal works
    j.append(j.next_seq(), msg(1))
    j.close()
    assert Journal(tmp_path).open() == [(1, msg(1))]


def test_unknown_version_is_moved_aside(tmp_path):
    (tmp_path / "reports.journal").write_text(
        '{"format": "drove-agent-report-journal", "version": 99}\n'
    )
    assert Journal(tmp_path).open() == []
    assert list(tmp_path.glob("reports.journal.corrupt-*"))


def test_state_dir_is_created(tmp_path):
    j = Journal(tmp_path / "a" / "b")
    j.open()
    assert (tmp_path / "a" / "b" / "reports.journal").exists()
