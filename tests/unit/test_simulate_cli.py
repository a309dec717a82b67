"""`byteback simulate` as a user meets it: options, output, the SVG, and one-line errors."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from simulate import cli

SMALL = ["--years", "0.5", "--hosts", "2", "--jobs", "1"]
SVG = "{http://www.w3.org/2000/svg}"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_arguments_compares_every_builtin_policy_with_a_table_and_a_chart(capsys):
    code, out, err = run(capsys, *SMALL)
    assert code == 0 and err == ""
    for name in ("original", "original-code", "age", "week"):
        assert f"\n{name} " in out
    assert "worst gap / age" in out
    assert "kept snapshots at the end, by age (logarithmic" in out
    assert "1w" in out and "now" in out


def test_json_is_deterministic_for_a_seed(capsys):
    first = run(capsys, *SMALL, "--json", "--seed", "3", "--policy", "original", "--targets", "0,1,2,7,30")
    again = run(capsys, *SMALL, "--json", "--seed", "3", "--policy", "original", "--targets", "0,1,2,7,30")
    other = run(capsys, *SMALL, "--json", "--seed", "4", "--policy", "original", "--targets", "0,1,2,7,30")
    assert first == again
    assert first[1] != other[1]
    doc = json.loads(first[1])
    assert [p["name"] for p in doc["policies"]] == ["original", "targets"]
    assert doc["policies"][1]["targets"] == [0.0, 1.0, 2.0, 7.0, 30.0]
    assert set(doc["policies"][0]["final"]["worst_gap"]) == {"0-7d", "7-30d", "30-90d", "90-365d", ">1y"}


def test_svg_parses_and_has_one_series_per_policy(capsys, tmp_path):
    picture = tmp_path / "retention.svg"
    code, out, _ = run(capsys, *SMALL, "--svg", str(picture), "--policy", "original",
                       "--policy", "week", "--policy", "age")
    assert code == 0
    root = ET.parse(picture).getroot()
    assert root.tag == SVG + "svg"
    series = [g for g in root.iter(SVG + "g") if g.get("class") == "series"]
    assert [g.get("data-policy") for g in series] == ["original", "week", "age"]
    assert all(len(list(g.iter(SVG + "rect"))) > 2 for g in series)
    texts = "".join(t.text or "" for t in root.iter(SVG + "text"))
    assert "1w" in texts and "now" in texts and "age of the kept snapshot" in texts


def test_the_same_seed_writes_the_same_svg(capsys, tmp_path):
    for name in ("a.svg", "b.svg"):
        assert run(capsys, *SMALL, "--svg", str(tmp_path / name), "--policy", "week")[0] == 0
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


@pytest.mark.parametrize("argv,words", [
    (["--years", "-1"], "--years"),
    (["--years", "0"], "--years"),
    (["--disk", "2Q"], "not a disc size"),
    (["--interval", "5x"], "not a duration"),
    (["--full", "12 parsecs"], "not a size"),
    (["--targets", ""], "target list is empty"),
    (["--targets", ",,"], "target list is empty"),
    (["--targets", "1,-2"], "0 or more"),
    (["--policy", "nope"], "unknown policy"),
    (["--hosts", "0"], "--hosts"),
    (["--fail", "150%"], "fraction"),
    (["--interval", "1h"], "minimum interval"),
    (["--hostile", "nice"], "invalid choice"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_get_one_line_and_exit_2(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("byteback simulate: ") and err.count("\n") == 1
    assert words in err
    assert "Traceback" not in err


def test_help_documents_every_option(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for action in cli.build_parser()._actions:
        for option in action.option_strings:
            assert option in out


def test_list_presets(capsys):
    code, out, _ = run(capsys, "--list-presets")
    assert code == 0
    assert out.startswith("log ") or "original   0,1,2,3,7,14,21,28,56,112" in out
    assert "week       0,1,2,3,4,5,6,7" in out


def test_an_unwritable_svg_is_one_line_and_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, *SMALL, "--policy", "age", "--svg", str(tmp_path / "no" / "such.svg"))
    assert code == 1
    assert err.startswith("byteback simulate: cannot write ") and err.count("\n") == 1


def test_a_hostile_client_reports_what_survives(capsys):
    code, out, _ = run(capsys, "--years", "1", "--hosts", "3", "--jobs", "1", "--policy", "original",
                       "--hostile", "fill", "--attack-days", "20", "--no-chart")
    assert code == 0
    line, = [l for l in out.splitlines() if l.startswith("attack (fill, original)")]
    assert "without the attack" in line


def test_several_jobs_give_the_same_result_as_one(capsys):
    argv = ["--years", "0.5", "--hosts", "2", "--json", "--policy", "original", "--policy", "age"]
    assert run(capsys, *argv, "--jobs", "2") == run(capsys, *argv, "--jobs", "1")
