"""Unit tests of ``subid_sharers`` (section 8c): who else holds an id of a host account's range.

Two hosts on one range are one kernel uid (issue 8 class 9), so setup-host and
the forced command refuse such a range; these are the cases it must tell apart.
"""
from __future__ import annotations

import byteback

COUNT = byteback.SUBID_COUNT


def test_a_range_held_by_the_account_alone_has_no_sharers():
    entries = [("bb-web1", 100000, COUNT), ("bb-db1", 100000 + COUNT, COUNT), ("alice", 300000, COUNT)]
    assert byteback.subid_sharers(entries, "bb-web1", 998, 100000) == []


def test_its_own_lines_by_name_or_uid_are_not_sharers():
    entries = [("bb-web1", 100000, COUNT), ("998", 100000, COUNT)]
    assert byteback.subid_sharers(entries, "bb-web1", 998, 100000) == []


def test_the_same_range_or_any_overlap_at_either_end_is_shared():
    entries = [("bb-web1", 100000, COUNT), ("bb-web2", 100000, COUNT), ("alice", 100000 + COUNT - 1, 10),
               ("bob", 99990, 11), ("carol", 99990, 10), ("dave", 100000 + COUNT, 5)]
    assert byteback.subid_sharers(entries, "bb-web1", 998, 100000) == ["alice", "bb-web2", "bob"]
