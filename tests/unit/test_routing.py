"""The routing-rule language: conditions, combination, validation, settings.

The table-driven tests run a realistic rule set over real files of the shared
test data (values checked against the files: e.g. the TCIA pancreas CT has
Slice Thickness 3 and no Contrast/Bolus Agent, the NEMA CT has 5.000000 and
``ISOVUE300/100``); the property tests check the condition language itself on
synthetic headers.
"""

from __future__ import annotations

import ipaddress
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydicom import Dataset, dcmread

from service.errors import ConfigError
from service.routing import (
    ALL_DESTINATIONS,
    Fallback,
    Node,
    Rule,
    SeriesFacts,
    default_rules,
    evaluate,
    header_keywords,
    route,
    validate_rules,
)

# --------------------------------------------------------------------------------------
# a realistic rule set, and the real files it is tried on

RULES_YAML = """
rules:
  - name: exclude-derived
    when: {attribute: Modality, in: [SEG, SR, RWV, KO, PR]}
    models: []
    final: true
  - name: exclude-localizers
    when: {attribute: ImageType, equals: localizer}
    models: []
    final: true
  - name: ct-thin
    when:
      all:
        - {attribute: Modality, equals: ct}
        - {attribute: "(0018,0050)", range: {min: 0.5, max: 3}}
    models: [ct-seg]
    destinations: [PACS]
  - name: ct-contrast
    when:
      all:
        - {attribute: Modality, equals: CT}
        - {attribute: ContrastBolusAgent, present: true}
    models: [ct-seg, ct-qa]
    destinations: [ARCHIVE]
    priority: stat
  - name: brain-mr
    when:
      all:
        - {attribute: Modality, equals: MR}
        - {attribute: BodyPartExamined, in: [brain, head]}
        - not: {attribute: SeriesDescription, regex: "scout|localizer|^b0"}
    models: [mr-brain]
    completion: study
    quiet_period_s: 20
  - name: from-scanner
    when:
      any:
        - {association: calling_ae, in: [CT_SCANNER_1, MR_SCANNER_1]}
        - {association: peer_address, in: ["10.20.0.0/16", "192.168.1.7"]}
    models: [ct-qa]
    destinations: [sender]
fallback:
  models: []
  destinations: []
"""


def _rule_set() -> tuple[list[Rule], Fallback]:
    data = yaml.safe_load(RULES_YAML)
    return ([Rule.model_validate(r) for r in data["rules"]],
            Fallback.model_validate(data["fallback"]))


RULES, FALLBACK = _rule_set()


def _first_header(path: Path) -> Dataset:
    """The series' first file (sorted, as ``radnode rules test`` takes it), without pixels."""
    if path.is_dir():
        path = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".txt"
                      and not p.name.startswith(("LICENSE", "SOURCE", "CITATION")))[0]
    return dcmread(path, stop_before_pixels=True)


# (file or folder, association, matched rules, {model: (destinations, priority)}, scope,
#  quiet period, {rule: text its reason contains})
CASES: list[tuple[str, dict[str, str], tuple[str, ...], dict[str, tuple[tuple[str, ...], str]],
                  str, float | None, dict[str, str]]] = [
    ("ct_abdomen_pancreas_tcia", {}, ("ct-thin",), {"ct-seg": (("PACS",), "routine")},
     "series", None,
     {"ct-thin": "SliceThickness 3.0 in [0.5, 3]",  # the upper bound is inclusive
      "ct-contrast": "ContrastBolusAgent is absent",
      "exclude-derived": "Modality is 'CT', not in [SEG, SR, RWV, KO, PR]",
      "exclude-localizers": "ImageType is 'ORIGINAL\\PRIMARY\\AXIAL', no value equal to "
                            "'localizer'",
      "brain-mr": "Modality is 'CT', not equal to 'MR'",
      "from-scanner": "calling_ae is absent) or (peer_address is absent"}),
    ("ct_head_ge_gantry_tilt", {}, ("fallback",), {}, "series", None,
     {"ct-thin": "SliceThickness 4.0 not in [0.5, 3]",
      "ct-contrast": "ContrastBolusAgent is absent"}),
    ("transfer_syntaxes/nema_wg04/CT1_J2KI.dcm", {}, ("ct-contrast",),
     {"ct-seg": (("ARCHIVE",), "stat"), "ct-qa": (("ARCHIVE",), "stat")}, "series", None,
     {"ct-thin": "SliceThickness 5.0 not in [0.5, 3]",
      "ct-contrast": "Modality is 'CT' and ContrastBolusAgent is present"}),
    ("seg_sr/highdicom/ct_image.dcm", {"calling_ae": "ct_scanner_1"},
     ("ct-contrast", "from-scanner"),
     {"ct-seg": (("ARCHIVE",), "stat"), "ct-qa": (("ARCHIVE", "sender"), "stat")}, "series",
     None, {"from-scanner": "calling_ae is 'ct_scanner_1', in [CT_SCANNER_1, MR_SCANNER_1]"}),
    ("seg_sr/dcmqi_ct_liver_seg/ct_3slice", {"peer_address": "10.20.30.40"},
     ("ct-thin", "from-scanner"),
     {"ct-seg": (("PACS",), "routine"), "ct-qa": (("sender",), "routine")}, "series", None,
     {"ct-thin": "SliceThickness 1.25 in [0.5, 3]",
      "from-scanner": "peer_address '10.20.30.40' is in [10.20.0.0/16, 192.168.1.7]"}),
    ("mr_head_siemens_t1_sag", {"peer_address": "10.21.0.1"}, ("brain-mr",),
     {"mr-brain": ((ALL_DESTINATIONS,), "routine")}, "study", 20.0,
     {"brain-mr": "BodyPartExamined is 'BRAIN', in [brain, head] and not(...): "
                  "SeriesDescription 't1_fl2d_sag' does not match /scout|localizer|^b0/",
      "from-scanner": "peer_address '10.21.0.1' is not in [10.20.0.0/16, 192.168.1.7]"}),
    ("enhanced_multiframe/siemens_xa30_t1", {}, ("brain-mr",),
     {"mr-brain": ((ALL_DESTINATIONS,), "routine")}, "study", 20.0, {}),
    ("enhanced_multiframe/philips_fieldmap/IM_0027_fMAP.dcm", {}, ("fallback",), {}, "series",
     None, {"brain-mr": "not(...) failed: SeriesDescription 'B0 NS' matches "
                        "/scout|localizer|^b0/"}),
    ("enhanced_multiframe/pydicom_data/emri_small.dcm", {}, ("brain-mr",),
     {"mr-brain": ((ALL_DESTINATIONS,), "routine")}, "study", 20.0,
     {"brain-mr": "BodyPartExamined is 'HEAD', in [brain, head] and not(...): "
                  "SeriesDescription is empty"}),
    ("transfer_syntaxes/dcm_qa_ts/1.dcm", {}, ("fallback",), {}, "series", None,
     {"brain-mr": "BodyPartExamined is absent"}),
    ("seg_sr/dcmqi_ct_liver_seg/liver.dcm", {"calling_ae": "CT_SCANNER_1"},
     ("exclude-derived",), {}, "series", None,
     {"exclude-derived": "Modality is 'SEG', in [SEG, SR, RWV, KO, PR]",
      "from-scanner": "not evaluated: final rule 'exclude-derived' matched"}),
    ("seg_sr/dcmqi_sr_tid1500/sr.dcm", {}, ("exclude-derived",), {}, "series", None,
     {"exclude-derived": "Modality is 'SR'"}),
    ("seg_sr/dcmqi_sr_tid1500/rwvm.dcm", {}, ("exclude-derived",), {}, "series", None, {}),
    ("transfer_syntaxes/dclunie/image_dfl.dcm", {"calling_ae": "WORKSTATION"}, ("fallback",),
     {}, "series", None,
     {"ct-thin": "Modality is 'OT', not equal to 'ct'",
      "from-scanner": "no branch of any(...) holds: (calling_ae is 'WORKSTATION', not in "
                      "[CT_SCANNER_1, MR_SCANNER_1]) or (peer_address is absent)"}),
    ("transfer_syntaxes/gdcm/Philips_US_3EAF5680_8b_YBR_jpeg.dcm", {}, ("fallback",), {},
     "series", None, {}),
]


@pytest.mark.parametrize(("where", "association", "matched", "targets", "scope", "quiet",
                          "reasons"), CASES, ids=[c[0] for c in CASES])
def test_rule_set_on_real_files(test_data_dir: Path, where: str, association: dict[str, str],
                                matched: tuple[str, ...],
                                targets: dict[str, tuple[tuple[str, ...], str]], scope: str,
                                quiet: float | None, reasons: dict[str, str]) -> None:
    facts = SeriesFacts(header=_first_header(test_data_dir / where), **association)
    routing = route(RULES, FALLBACK, facts)
    assert routing.matched == matched
    assert {t.model: (t.destinations, t.priority) for t in routing.targets} == targets
    assert routing.scope == scope
    assert routing.quiet_period_s == quiet
    by_name = {r.rule.name: r for r in routing.results}
    assert [r.rule.name for r in routing.results] == [r.name for r in RULES]
    for name, text in reasons.items():
        assert text in by_name[name].reason, by_name[name].reason
    for result in routing.results:
        assert result.matched == (result.rule.name in matched)


def test_real_header_read_with_only_the_needed_tags(test_data_dir: Path) -> None:
    """What the node reads (header_keywords) is enough to decide as with the full header."""
    wanted = sorted(header_keywords(RULES, FALLBACK))
    assert {"Modality", "ImageType", "SliceThickness", "ContrastBolusAgent",
            "BodyPartExamined", "SeriesDescription"} == set(wanted)
    for where in ("ct_abdomen_pancreas_tcia/1-001.dcm", "seg_sr/highdicom/ct_image.dcm",
                  "enhanced_multiframe/philips_fieldmap/IM_0027_fMAP.dcm",
                  "seg_sr/dcmqi_sr_tid1500/sr.dcm"):
        path = test_data_dir / where
        full = route(RULES, FALLBACK, SeriesFacts(dcmread(path, stop_before_pixels=True)))
        partial = route(RULES, FALLBACK, SeriesFacts(dcmread(path, specific_tags=wanted)))
        assert partial.targets == full.targets
        assert [r.reason for r in partial.results] == [r.reason for r in full.results]


def test_localizer_in_multivalued_image_type(test_data_dir: Path) -> None:
    header = _first_header(test_data_dir / "ct_abdomen_pancreas_tcia")
    header.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    routing = route(RULES, FALLBACK, SeriesFacts(header))
    assert routing.matched == ("exclude-localizers",)
    assert routing.targets == ()
    assert routing.results[1].reason == (
        "ImageType 'ORIGINAL\\PRIMARY\\LOCALIZER' includes 'localizer'")


def test_patient_values_are_never_quoted(test_data_dir: Path) -> None:
    header = _first_header(test_data_dir / "ct_abdomen_pancreas_tcia")
    name, patient_id = str(header.PatientName), str(header.PatientID)
    rules = [_rule("a", {"attribute": "PatientName", "regex": "^nobody$"}),
             _rule("b", {"attribute": "PatientID", "present": False}),
             _rule("c", {"attribute": "PatientID", "equals": "x"})]
    results = evaluate(rules, SeriesFacts(header))
    for result in results:
        assert not result.matched
        assert name not in result.reason and patient_id not in result.reason
        assert "<withheld>" in result.reason


def test_attribute_inside_sequences_is_not_seen(test_data_dir: Path) -> None:
    """Enhanced MR keeps Slice Thickness in functional groups: at top level it is absent."""
    header = _first_header(test_data_dir / "enhanced_multiframe/siemens_xa30_t1")
    [result] = evaluate([_rule("t", {"attribute": "SliceThickness", "range": {"max": 5}})],
                        SeriesFacts(header))
    assert (result.matched, result.reason) == (False, "SliceThickness is absent")
    [result] = evaluate([_rule("s", {"attribute": "SharedFunctionalGroupsSequence",
                                     "present": True})], SeriesFacts(header))
    assert result.matched


# --------------------------------------------------------------------------------------
# combination

def _rule(name: str, when: dict[str, Any] | None = None, **fields: Any) -> Rule:
    return Rule.model_validate({"name": name, "when": when, "models": ["m"]} | fields)


def _facts(**attributes: Any) -> SeriesFacts:
    header = Dataset()
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    return SeriesFacts(header=header, calling_ae="SCANNER", peer_address="10.0.0.1")


CT = {"attribute": "Modality", "equals": "CT"}


def test_destinations_union_and_stat_wins() -> None:
    rules = [_rule("a", CT, models=["seg", "qa"], destinations=["PACS"]),
             _rule("b", None, models=["seg"], destinations=["sender", "PACS"], priority="stat"),
             _rule("c", CT, models=["seg"]),
             _rule("d", {"attribute": "Modality", "equals": "MR"}, models=["seg"],
                   destinations=["OTHER"], priority="stat")]
    routing = route(rules, Fallback(), _facts(Modality="CT"))
    assert routing.matched == ("a", "b", "c")
    seg, qa = routing.targets
    assert (seg.model, seg.destinations, seg.priority, seg.rules) == (
        "seg", ("PACS", "sender", ALL_DESTINATIONS), "stat", ("a", "b", "c"))
    assert (qa.model, qa.destinations, qa.priority, qa.rules) == (
        "qa", ("PACS",), "routine", ("a",))


def test_final_stops_and_later_rules_are_not_evaluated() -> None:
    rules = [_rule("a", CT, models=["seg"]), _rule("stop", CT, models=[], final=True),
             _rule("c", None, models=["other"])]
    results = evaluate(rules, _facts(Modality="CT"))
    assert [(r.matched, r.evaluated) for r in results] == [(True, True), (True, True),
                                                          (False, False)]
    assert results[2].reason == "not evaluated: final rule 'stop' matched"
    routing = route(rules, Fallback(models=["fb"]), _facts(Modality="CT"))
    assert routing.matched == ("a", "stop")
    assert [t.model for t in routing.targets] == ["seg"]


def test_final_rule_that_does_not_match_does_not_stop() -> None:
    rules = [_rule("stop", {"attribute": "Modality", "equals": "MR"}, final=True),
             _rule("b", None)]
    assert [r.evaluated for r in evaluate(rules, _facts(Modality="CT"))] == [True, True]


def test_fallback_applies_only_when_nothing_matched() -> None:
    rules = [_rule("mr", {"attribute": "Modality", "equals": "MR"}, priority="stat",
                   completion="study", quiet_period_s=9)]
    fallback = Fallback(models=["triage", "triage"], destinations=["PACS"])
    routing = route(rules, fallback, _facts(Modality="CT"))
    assert routing.matched == ("fallback",)
    assert [(t.model, t.destinations, t.priority, t.rules) for t in routing.targets] == [
        ("triage", ("PACS",), "routine", ("fallback",))]
    assert (routing.scope, routing.quiet_period_s) == ("series", None)
    assert route(rules, Fallback(models=["x"]), _facts(Modality="CT")).targets[0].destinations \
        == (ALL_DESTINATIONS,)
    assert route([], Fallback(), _facts(Modality="CT")).targets == ()


def test_matching_rule_without_models_prevents_the_fallback() -> None:
    routing = route([_rule("store-only", CT, models=[])], Fallback(models=["fb"]),
                    _facts(Modality="CT"))
    assert routing.matched == ("store-only",)
    assert routing.targets == ()


def test_scope_and_quiet_period_combine() -> None:
    rules = [_rule("a", CT, quiet_period_s=5), _rule("b", None, completion="study"),
             _rule("c", None, quiet_period_s=30.5), _rule("d", {"attribute": "Modality",
                                                                "equals": "MR"},
                                                        quiet_period_s=99)]
    routing = route(rules, Fallback(), _facts(Modality="CT"))
    assert (routing.scope, routing.quiet_period_s) == ("study", 30.5)
    routing = route(rules[:1], Fallback(), _facts(Modality="CT"))
    assert (routing.scope, routing.quiet_period_s) == ("series", 5.0)


def test_rule_without_when_matches_everything() -> None:
    [result] = evaluate([_rule("all", None)], SeriesFacts(Dataset()))
    assert result.matched and result.reason == "no when: matches every series"


def test_default_rules() -> None:
    rules = default_rules()
    assert [(r.name, r.models, r.destinations, r.priority, r.completion) for r in rules] == [
        ("ct", ["radnode-builtin-ct"], None, "routine", "series"),
        ("mr", ["radnode-builtin-mr"], None, "routine", "series")]
    assert route(rules, Fallback(), _facts(Modality="MR")).targets[0].model == \
        "radnode-builtin-mr"
    assert route(rules, Fallback(), _facts(Modality="SEG")).matched == ("fallback",)
    assert default_rules() is not rules  # a fresh list each time


# --------------------------------------------------------------------------------------
# the condition language: examples

def _check(when: dict[str, Any], facts: SeriesFacts) -> tuple[bool, str]:
    return Node.model_validate(when).check(facts)


def test_empty_all_is_true_and_empty_any_is_false() -> None:
    facts = _facts(Modality="CT")
    assert _check({"all": []}, facts)[0] is True
    assert _check({"any": []}, facts)[0] is False
    assert _check({"not": {"any": []}}, facts)[0] is True


def test_any_reports_every_branch_and_all_the_first_failure() -> None:
    facts = _facts(Modality="MR", SliceThickness="7.0")
    ok, why = _check({"any": [CT, {"attribute": "SliceThickness",
                                   "range": {"min": 0.5, "max": 5}}]}, facts)
    assert not ok
    assert why == ("no branch of any(...) holds: (Modality is 'MR', not equal to 'CT') or "
                   "(SliceThickness 7.0 not in [0.5, 5])")
    ok, why = _check({"all": [{"attribute": "SeriesDescription", "present": True}, CT]}, facts)
    assert (ok, why) == (False, "SeriesDescription is absent")


def test_not_reason() -> None:
    ok, why = _check({"not": {"attribute": "SeriesDescription", "regex": "scout"}},
                     _facts(SeriesDescription="Scout"))
    assert (ok, why) == (False, "not(...) failed: SeriesDescription 'Scout' matches /scout/")


def test_regex_is_a_search_and_anchors_work() -> None:
    facts = _facts(SeriesDescription="Thorax 1.0 B30f")
    assert _check({"attribute": "SeriesDescription", "regex": r"1\.0"}, facts)[0]
    assert not _check({"attribute": "SeriesDescription", "regex": r"^1\.0"}, facts)[0]


def test_spaces_are_not_significant() -> None:
    facts = _facts(BodyPartExamined=" CHEST ", Modality="CT")
    assert _check({"attribute": "BodyPartExamined", "equals": "chest"}, facts)[0]
    assert _check({"attribute": "BodyPartExamined", "in": [" Chest  "]}, facts)[0]
    assert _check({"attribute": "BodyPartExamined", "regex": "^CHEST$"}, facts)[0]


def test_present_and_empty() -> None:
    facts = _facts(ContrastBolusAgent="", SeriesDescription="x")
    assert _check({"attribute": "ContrastBolusAgent", "present": False}, facts) == (
        True, "ContrastBolusAgent is empty")
    assert _check({"attribute": "ContrastBolusAgent", "present": True}, facts) == (
        False, "ContrastBolusAgent is empty")
    assert _check({"attribute": "BodyPartExamined", "present": False}, facts) == (
        True, "BodyPartExamined is absent")
    assert _check({"attribute": "SeriesDescription", "present": False}, facts) == (
        False, "SeriesDescription is present ('x')")
    assert _check({"attribute": "SeriesDescription", "equals": "x"}, _facts()) == (
        False, "SeriesDescription is absent")


def test_numbers_compare_as_numbers() -> None:
    facts = _facts(SliceThickness="3.000000", Rows=512, SeriesDescription="3.0")
    assert _check({"attribute": "SliceThickness", "equals": 3}, facts)[0]
    assert _check({"attribute": "SliceThickness", "in": ["2.5", "3"]}, facts)[0]
    assert _check({"attribute": "Rows", "equals": 512}, facts)[0]
    assert _check({"attribute": "Rows", "range": {"min": 512}}, facts) == (
        True, "Rows 512.0 in [512, +inf)")
    # a text attribute compares as text, unless the rule gives a number
    assert not _check({"attribute": "SeriesDescription", "equals": "3"}, facts)[0]
    assert _check({"attribute": "SeriesDescription", "equals": 3}, facts)[0]
    ok, why = _check({"attribute": "SeriesDescription", "range": {"max": 1}},
                     _facts(SeriesDescription="abc"))
    assert (ok, why) == (False, "SeriesDescription 'abc' is not a number")


def test_tags_and_keywords_are_the_same_attribute() -> None:
    facts = _facts(SliceThickness="2")
    for spelling in ("SliceThickness", "(0018,0050)", "00180050", "(0018, 0050)"):
        assert _check({"attribute": spelling, "equals": 2}, facts) == (
            True, "SliceThickness is '2'")


def test_private_tag_attribute() -> None:
    header = Dataset()
    header.add_new(0x00091001, "LO", "GEMS_IDEN_01")
    facts = SeriesFacts(header)
    assert _check({"attribute": "(0009,1001)", "equals": "gems_iden_01"}, facts) == (
        True, "(0009,1001) is 'GEMS_IDEN_01'")
    rule = _rule("p", {"attribute": "00091001", "present": True})
    assert header_keywords([rule]) == {"Modality", "00091001"}


def test_association_subjects() -> None:
    facts = SeriesFacts(Dataset(), calling_ae=" ct_scanner_1 ", called_ae="RADNODE",
                        peer_address="::ffff:10.1.2.3")
    assert _check({"association": "calling_ae", "equals": "CT_SCANNER_1"}, facts)[0]
    assert not _check({"association": "calling_ae", "equals": "CT_SCANNER_1",
                       "case_sensitive": True}, facts)[0]
    assert _check({"association": "called_ae", "regex": "^radnode$"}, facts)[0]
    assert _check({"association": "peer_address", "in": ["10.0.0.0/8"]}, facts)[0]
    assert _check({"association": "peer_address", "equals": "10.1.2.3"}, facts)[0]
    assert _check({"association": "peer_address", "in": ["::1"]},
                  SeriesFacts(Dataset(), peer_address="::1"))[0]
    assert _check({"association": "peer_address", "in": ["10.0.0.0/8"]},
                  SeriesFacts(Dataset(), peer_address="not-an-ip")) == (
        False, "peer_address 'not-an-ip' is not an IP address")
    assert _check({"association": "calling_ae", "present": False}, SeriesFacts(Dataset())) == (
        True, "calling_ae is absent")


# --------------------------------------------------------------------------------------
# the condition language: properties

KEYWORD_VALUES = {
    "Modality": ["CT"],
    "SeriesDescription": ["Chest 1.0 B30f"],
    "SliceThickness": ["2.5"],
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
}
ABSENT = ["BodyPartExamined", "ContrastBolusAgent"]
PATTERNS = ["^CT$", "chest", "B\\d+f", "^$", "AXIAL", "xyz", "1\\.0"]


def _synthetic() -> SeriesFacts:
    header = Dataset()
    header.Modality = "CT"
    header.SeriesDescription = "Chest 1.0 B30f"
    header.SliceThickness = "2.5"
    header.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    return SeriesFacts(header, calling_ae="SCANNER", peer_address="10.0.0.1")


SYNTHETIC = _synthetic()
WORDS = st.sampled_from(["CT", "ct", "MR", "Chest 1.0 B30f", "chest 1.0 b30f", "AXIAL",
                         "axial", "2.5", "2.50", "x"])
LEAVES = st.one_of(
    st.builds(lambda k, v: {"attribute": k, "equals": v},
              st.sampled_from([*KEYWORD_VALUES, *ABSENT]), WORDS),
    st.builds(lambda k, v: {"attribute": k, "in": v},
              st.sampled_from([*KEYWORD_VALUES, *ABSENT]), st.lists(WORDS, min_size=1,
                                                                    max_size=3)),
    st.builds(lambda k, p: {"attribute": k, "regex": p},
              st.sampled_from([*KEYWORD_VALUES, *ABSENT]), st.sampled_from(PATTERNS)),
    st.builds(lambda k, b: {"attribute": k, "present": b},
              st.sampled_from([*KEYWORD_VALUES, *ABSENT]), st.booleans()),
    st.builds(lambda lo, hi: {"attribute": "SliceThickness", "range": {"min": lo, "max": hi}},
              st.sampled_from([None, 0.0, 2.5, 3.0]), st.sampled_from([None, 2.0, 2.5, 9.0]))
    .filter(lambda r: r["range"] != {"min": None, "max": None}
            and (r["range"]["min"] or 0) <= (r["range"]["max"] or 99)),
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda nodes: {"all": nodes}),
        st.lists(children, max_size=4).map(lambda nodes: {"any": nodes}),
        children.map(lambda node: {"not": node}),
    ),
    max_leaves=12,
)


def _oracle(tree: dict[str, Any]) -> bool:
    """An independent reading of the language on the synthetic header."""
    if "all" in tree:
        return all(_oracle(n) for n in tree["all"])
    if "any" in tree:
        return any(_oracle(n) for n in tree["any"])
    if "not" in tree:
        return not _oracle(tree["not"])
    values = KEYWORD_VALUES.get(tree["attribute"], [])
    if "present" in tree:
        return bool(values) == tree["present"]
    if "range" in tree:
        low, high = tree["range"]["min"], tree["range"]["max"]
        return any((low is None or float(v) >= low) and (high is None or float(v) <= high)
                   for v in values)
    if "regex" in tree:
        flags = 0 if tree["attribute"] == "SliceThickness" else re.IGNORECASE
        return any(re.search(tree["regex"], v, flags) for v in values)
    wanted = [tree["equals"]] if "equals" in tree else tree["in"]
    if tree["attribute"] == "SliceThickness":  # DS: numbers, else case-sensitive text
        return any(_same_number(v, w) if _is_number(w) else v == w
                   for v in values for w in wanted)
    return any(v.casefold() == w.casefold() for v in values for w in wanted)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _same_number(a: str, b: str) -> bool:
    return float(a) == float(b)


@given(TREES)
@settings(max_examples=300, deadline=None)
def test_trees_agree_with_python_all_any_not(tree: dict[str, Any]) -> None:
    node = Node.model_validate(tree)
    assert node.check(SYNTHETIC)[0] == _oracle(tree)


@given(TREES)
@settings(max_examples=100, deadline=None)
def test_not_negates(tree: dict[str, Any]) -> None:
    plain = Node.model_validate(tree).check(SYNTHETIC)
    negated = Node.model_validate({"not": tree}).check(SYNTHETIC)
    double = Node.model_validate({"not": {"not": tree}}).check(SYNTHETIC)
    assert negated[0] is (not plain[0])
    assert double[0] is plain[0]
    assert plain[1] in negated[1]


@given(st.lists(TREES, max_size=5))
@settings(max_examples=100, deadline=None)
def test_all_and_any_over_children(trees: list[dict[str, Any]]) -> None:
    outcomes = [Node.model_validate(t).check(SYNTHETIC)[0] for t in trees]
    assert Node.model_validate({"all": trees}).check(SYNTHETIC)[0] is all(outcomes)
    assert Node.model_validate({"any": trees}).check(SYNTHETIC)[0] is any(outcomes)


@given(TREES)
@settings(max_examples=100, deadline=None)
def test_dump_round_trip(tree: dict[str, Any]) -> None:
    node = Node.model_validate(tree)
    dumped = node.model_dump(mode="json")
    again = Node.model_validate(dumped)
    assert again == node
    assert again.check(SYNTHETIC) == node.check(SYNTHETIC)
    assert yaml.safe_load(yaml.safe_dump(dumped)) == dumped


TEXT = st.text(alphabet="abcXYZ019 .-_", min_size=1, max_size=12).filter(lambda s: s.strip())


@given(TEXT)
@settings(max_examples=200, deadline=None)
def test_case_insensitive_for_cs_lo_sensitive_for_ui_ur(value: str) -> None:
    header = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # letters are not valid in a UI: compare anyway
        header.Modality = value                # CS
        header.SeriesDescription = value       # LO
        header.SeriesInstanceUID = value       # UI
        header.RetrieveURL = value             # UR
    facts = SeriesFacts(header)
    other = value.swapcase()
    same_case = other.strip() == value.strip()
    for keyword in ("Modality", "SeriesDescription"):
        assert _check({"attribute": keyword, "equals": other}, facts)[0]
        assert _check({"attribute": keyword, "in": ["?", other]}, facts)[0]
        assert _check({"attribute": keyword, "equals": other, "case_sensitive": True},
                      facts)[0] is same_case
    for keyword in ("SeriesInstanceUID", "RetrieveURL"):
        assert _check({"attribute": keyword, "equals": other}, facts)[0] is same_case
        assert _check({"attribute": keyword, "equals": other, "case_sensitive": False},
                      facts)[0]
        assert _check({"attribute": keyword, "equals": value}, facts)[0]


FLOATS = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(FLOATS, FLOATS, FLOATS)
@settings(max_examples=300, deadline=None)
def test_range_is_inclusive(value: float, a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    header = Dataset()
    header.RevolutionTime = value  # FD: the value itself, no text rounding
    facts = SeriesFacts(header)
    node = {"attribute": "RevolutionTime", "range": {"min": low, "max": high}}
    assert _check(node, facts)[0] is (low <= value <= high)
    for bound in (low, high):
        header.RevolutionTime = bound
        assert _check(node, SeriesFacts(header))[0]
    header.RevolutionTime = value
    assert _check({"attribute": "RevolutionTime", "range": {"min": value}}, facts)[0]
    assert _check({"attribute": "RevolutionTime", "range": {"max": value}}, facts)[0]


@given(st.integers(-1000, 1000), st.integers(-1000, 1000), st.integers(-1000, 1000))
@settings(max_examples=200, deadline=None)
def test_range_on_multivalued_is_any(a: int, b: int, c: int) -> None:
    header = Dataset()
    header.PixelSpacing = [str(a), str(b)]  # DS, 2 values
    facts = SeriesFacts(header)
    assert _check({"attribute": "PixelSpacing", "range": {"min": c, "max": c}}, facts)[0] is (
        c in (a, b))


ADDRESSES = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)
NETWORKS = st.one_of(
    st.builds(lambda n, p: f"{ipaddress.IPv4Address(n)}/{p}", st.integers(0, 2**32 - 1),
              st.integers(0, 32)),
    st.builds(lambda n, p: f"{ipaddress.IPv6Address(n)}/{p}", st.integers(0, 2**128 - 1),
              st.integers(0, 128)),
    ADDRESSES,
)


@given(ADDRESSES, st.lists(NETWORKS, min_size=1, max_size=4))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_cidr_membership_agrees_with_ipaddress(address: str, networks: list[str]) -> None:
    expected = any(ipaddress.ip_address(address) in ipaddress.ip_network(n, strict=False)
                   for n in networks)
    facts = SeriesFacts(Dataset(), peer_address=address)
    assert _check({"association": "peer_address", "in": networks}, facts)[0] is expected
    # the network's own address is always inside it
    base = networks[0].split("/")[0]
    assert _check({"association": "peer_address", "in": networks},
                  SeriesFacts(Dataset(), peer_address=base))[0]


# --------------------------------------------------------------------------------------
# validation

@pytest.mark.parametrize(("node", "message"), [
    ({"attribute": "Modality", "equals": "CT", "regex": "x"},
     "condition needs exactly one of equals, in, regex, range, present; got equals, regex"),
    ({"attribute": "Modality"},
     "condition needs exactly one of equals, in, regex, range, present; got none"),
    ({"equals": "CT"}, "condition needs exactly one of attribute, association; got neither"),
    ({"attribute": "Modality", "association": "calling_ae", "equals": "CT"},
     "condition needs exactly one of attribute, association; got attribute, association"),
    ({"attribute": "Modalty", "equals": "CT"},
     "Modalty is not a DICOM keyword (did you mean Modality?)"),
    ({"attribute": "SeriesDescription", "regex": "scout("},
     "invalid regular expression 'scout(': missing ), unterminated subpattern at position 5"),
    ({"all": [], "any": []}, "a node is a condition or exactly one of all, any, not; "
                             "got all, any"),
    ({"not": CT, "attribute": "Modality"}, "a node with not cannot also have attribute"),
    ({}, "empty node"),
    ({"attribute": "Modality", "equals": "CT", "typo": 1}, "Extra inputs are not permitted"),
    ({"attribute": "Modality", "equals": True}, "got a boolean"),
    ({"attribute": "Modality", "in": []}, "in needs at least one value"),
    ({"attribute": "Modality", "in": ["CT", " "]},
     "in with an empty value never matches"),
    ({"attribute": "Modality", "equals": ""}, "use present: false"),
    ({"attribute": "SliceThickness", "range": {}}, "range needs min, max or both"),
    ({"attribute": "SliceThickness", "range": {"min": 5, "max": 0.5}},
     "range min 5 is greater than max 0.5"),
    ({"attribute": "SliceThickness", "range": {"max": 5}, "case_sensitive": True},
     "case_sensitive does not apply to range"),
    ({"association": "calling_ae", "range": {"max": 5}},
     "range does not apply to association calling_ae"),
    ({"association": "peer_address", "in": ["10.0.0.0/33"]},
     "peer_address: '10.0.0.0/33' is not an IP address or CIDR network"),
    ({"association": "peer_ip", "equals": "1.2.3.4"}, "calling_ae"),
    ({"attribute": "ReferencedImageSequence", "equals": "x"},
     "ReferencedImageSequence is a sequence (VR SQ); only present applies"),
    ({"all": [CT, {"not": {"attribute": "ImageTyp", "equals": "X"}}]},
     "ImageTyp is not a DICOM keyword"),
])
def test_node_validation_messages(node: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Node.model_validate(node)
    assert message in str(caught.value)


@pytest.mark.parametrize(("rule", "message"), [
    ({"name": "chest ct", "models": []}, "rule name 'chest ct' must be 1-64 characters"),
    ({"name": "x" * 65, "models": []}, "must be 1-64 characters"),
    ({"name": "x"}, "models\n  Field required"),
    ({"name": "x", "models": [], "priority": "urgent"}, "'routine' or 'stat'"),
    ({"name": "x", "models": [], "completion": "patient"}, "'series' or 'study'"),
    ({"name": "x", "models": [], "quiet_period_s": 0}, "greater than 0"),
    ({"name": "x", "models": [], "whn": {}}, "whn\n  Extra inputs are not permitted"),
])
def test_rule_validation_messages(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Rule.model_validate(rule)
    assert message in str(caught.value)


def test_validate_rules_names_models_and_destinations() -> None:
    rules = [_rule("ct", CT, models=["seg"], destinations=["PACS", "sender"]),
             _rule("chest-ct", CT, models=["liver", "seg"], destinations=["PAC"]),
             _rule("ct", None, models=[])]
    problems = validate_rules(rules, Fallback(models=["nope"], destinations=["ARCHIVE"]),
                              models={"seg", "qa"}, destinations={"PACS", "ARCHIVE"})
    assert problems == [
        "rules[1] (chest-ct): model 'liver' is not declared under models (declared: qa, seg)",
        "rules[1] (chest-ct): destination 'PAC' is not configured under destinations "
        "(configured: ARCHIVE, PACS; or 'sender')",
        "rules[2] (ct): name 'ct' is already used by rules[0]; each rule name once",
        "fallback: model 'nope' is not declared under models (declared: qa, seg)",
    ]
    assert validate_rules(default_rules(), Fallback(), models={"radnode-builtin-ct",
                                                                "radnode-builtin-mr"},
                          destinations=set()) == []


# --------------------------------------------------------------------------------------
# through the settings

@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("RADNODE_"):
            monkeypatch.delenv(name)


def _settings_yaml(tmp_path: Path, **content: Any) -> Path:
    base: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "destinations": ["PACS@10.0.0.5:104",
                         {"ae_title": "ARCHIVE", "host": "10.0.0.6", "port": 11112}],
    }
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(base | content), encoding="utf-8")
    return path


@pytest.mark.usefixtures("_clean_env")
def test_settings_load_rules(tmp_path: Path) -> None:
    from service.config import dump_settings, load_settings

    rules = yaml.safe_load(RULES_YAML)["rules"]
    for rule in rules:  # use the built-in models, the configured destinations
        rule["models"] = ["radnode-builtin-ct"] if rule["models"] else []
        if rule.get("destinations") and rule["destinations"] != ["sender"]:
            rule["destinations"] = ["PACS"]
    loaded = load_settings(_settings_yaml(tmp_path, rules=rules,
                                          fallback={"models": ["radnode-builtin-mr"]}))
    assert [r.name for r in loaded.rules] == [r["name"] for r in rules]
    assert loaded.fallback.models == ["radnode-builtin-mr"]
    assert loaded.rules[2].when is not None
    assert loaded.rules[2].when.all_ is not None
    assert loaded.rules[2].when.all_[1].tag == 0x00180050
    # the dump that hands the settings to a worker loads again to the same rules
    dumped = tmp_path / "dumped.yaml"
    dump_settings(loaded, dumped)
    again = load_settings(dumped)
    assert again.rules == loaded.rules
    assert again.fallback == loaded.fallback
    assert again.config_version == loaded.config_version


@pytest.mark.usefixtures("_clean_env")
def test_settings_default_rules(tmp_path: Path) -> None:
    from service.config import load_settings

    loaded = load_settings(_settings_yaml(tmp_path))
    assert [r.name for r in loaded.rules] == ["ct", "mr"]
    assert loaded.fallback.models == []


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize(("content", "messages"), [
    ({"rules": [{"name": "x", "models": ["liver"], "destinations": ["NOPE", "sender"]}]},
     ["rules[0] (x): model 'liver' is not declared under models",
      "rules[0] (x): destination 'NOPE' is not configured under destinations "
      "(configured: ARCHIVE, PACS; or 'sender')"]),
    ({"rules": [{"name": "x", "models": [], "when": {"attribute": "Modalty", "equals": "CT"}}]},
     ["rules.0.when", "Modalty is not a DICOM keyword"]),
    ({"rules": [{"name": "a", "models": []}, {"name": "a", "models": []}]},
     ["rules[1] (a): name 'a' is already used by rules[0]"]),
    ({"fallback": {"models": [], "destinatons": []}}, ["fallback.destinatons"]),
])
def test_settings_reject_bad_rules(tmp_path: Path, content: dict[str, Any],
                                   messages: list[str]) -> None:
    from service.config import load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(_settings_yaml(tmp_path, **content))
    for message in messages:
        assert message in str(caught.value)
