"""The pure NodeId parser validate uses, and empty periods: pure units."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from parallelcity.field.opcua.node_id import NodeRef, check_scenario_node, parse_node_text
from parallelcity.twin.schedule import Period


def test_scenario_node_ids_parse() -> None:
    assert parse_node_text("s=dh/plant/T_supply") == NodeRef(None, "s", "dh/plant/T_supply")
    assert parse_node_text("i=4294967295") == NodeRef(None, "i", 4294967295)
    assert parse_node_text("ns=3;i=7") == NodeRef(3, "i", 7)
    assert check_scenario_node("s=a=b;c") == "s=a=b;c"
    guid = parse_node_text("g=09087e75-8e5e-499b-954f-f2a9603db28a")
    assert (guid.type, str(guid.identifier)) == ("g", "09087e75-8e5e-499b-954f-f2a9603db28a")
    assert parse_node_text("b=AAEC") == NodeRef(None, "b", b"\x00\x01\x02")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("ns=;;i=zzz!!", "'ns=' needs an integer"),
        ("i=-7", "'i=' needs an integer"),
        ("ns=70000;i=1", "'ns=70000' is above 65535"),
        ("i=4294967296", "is above 4294967295"),
        ("i=٣", "'i=' needs an integer"),  # a digit, but not an ASCII one
        ("s=", "is empty"),
        ("dh/plant", "must look like"),
        ("x=1", "must look like"),
        ("g=09087e75-8e5e-499b", "'g=' needs a GUID"),
        ("b=not base64!", "'b=' needs base64"),
        ("s=a\nb", "control characters"),
        ("s=" + "x" * 5000, "longer than 4096"),
    ],
)
def test_garbage_node_ids_are_refused_saying_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="NodeId") as err:
        parse_node_text(text)
    assert words in str(err.value)


def test_a_scenario_node_id_takes_its_namespace_from_the_field() -> None:
    with pytest.raises(ValueError, match=r"field\.namespace"):
        check_scenario_node("ns=2;s=dh/plant/T_supply")


@pytest.mark.parametrize(
    ("start", "end"), [("06:00", "06:00"), ("00:00", "00:00"), ("24:00", "00:00")]
)
def test_an_empty_period_is_refused_with_how_to_write_a_whole_day(start: str, end: str) -> None:
    with pytest.raises(ValidationError, match='start = "00:00", end = "24:00"'):
        Period(start=start, end=end)


def test_a_whole_day_and_a_night_are_periods() -> None:
    assert Period(start="00:00", end="24:00").contains(12 * 3600.0)
    assert Period(start="23:00", end="06:00").contains(2 * 3600.0)
