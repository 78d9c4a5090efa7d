"""Audit log: chain, checkpoints, resume, escaping; the verifier names edits, deletions,
insertions and reorderings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkiln.security.audit import AuditLog, verify_audit_log


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync_interval_s=0, checkpoint_every=4)
    for i in range(10):
        log.write("request", principal=f"key:{i}", status=200)
    log.close()
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_log_verifies_with_checkpoints(log_file: Path) -> None:
    report = verify_audit_log(log_file)
    assert report.ok, report.problems
    assert report.lines == 13 and report.checkpoints == 3


def test_resume_continues_the_chain(log_file: Path) -> None:
    log = AuditLog(log_file, checkpoint_every=0)
    log.write("key.revoke", key_id="abc")
    log.close()
    assert verify_audit_log(log_file).ok
    assert json.loads(_lines(log_file)[-1])["seq"] == 13


def test_edited_line_is_found(log_file: Path) -> None:
    lines = _lines(log_file)
    lines[2] = lines[2].replace('"status":200', '"status":201')
    log_file.write_text("".join(lines))
    report = verify_audit_log(log_file)
    assert report.problems == ["line 3: edited (line 4 carries a different hash of it)"]


def test_deleted_inserted_reordered_lines_are_found(log_file: Path) -> None:
    lines = _lines(log_file)
    log_file.write_text("".join(lines[:5] + lines[6:]))
    assert "line 6: 1 line(s) deleted" in verify_audit_log(log_file).problems[0]
    log_file.write_text("".join([*lines[:5], lines[1], *lines[5:]]))
    assert "line 6: out of order or inserted" in verify_audit_log(log_file).problems[0]
    swapped = [*lines[:3], lines[4], lines[3], *lines[5:]]
    log_file.write_text("".join(swapped))
    assert verify_audit_log(log_file).problems[0].startswith("line 4: 1 line(s) deleted")
    log_file.write_text("".join([*lines[:5], "{not json\n", *lines[5:]]))
    assert "line 6: not an audit record" in verify_audit_log(log_file).problems[0]


def test_control_characters_cannot_forge_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)
    evil = 'x"}\n{"seq":1,"event":"key.create"}\r\x1b[2J\u2028'
    log.write("request", route=evil)
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 2 and lines[1] == b""
    assert all(32 <= b < 127 for b in lines[0])
    assert json.loads(lines[0])["route"] == evil
