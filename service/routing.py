"""Routing rules: which models analyse a received series, and where results go.

The ``rules:`` section of the configuration is a list of rules; ``fallback:``
says what happens to a series that no rule matches. Example::

    rules:
      - name: exclude-localizers
        when: {attribute: ImageType, equals: LOCALIZER}
        models: []                    # store, do not analyse
        final: true                   # later rules are not evaluated
      - name: chest-ct
        when:
          all:
            - {attribute: Modality, equals: CT}
            - {attribute: BodyPartExamined, in: [CHEST, THORAX]}
            - {attribute: SliceThickness, range: {min: 0.5, max: 5}}
            - not: {attribute: SeriesDescription, regex: "scout|topogram"}
            - {association: calling_ae, in: [CT_SCANNER_1]}
        models: [radnode-builtin-ct]
        destinations: [PACS, sender]  # omitted: all configured destinations
        priority: stat                # routine (default) | stat
        completion: study             # series (default) | study
        quiet_period_s: 30
    fallback:
      models: []                      # default: store, do not analyse

Rules
-----
``name``
    Required, unique, 1-64 characters of ``A-Z a-z 0-9 . _ -``.
``when``
    A condition tree; left out, the rule matches every series.
``models``
    Names declared under ``models:``; may be empty ("store, do not analyse").
``destinations``
    Names of configured destinations. The special name ``sender`` returns the
    results to the AE that sent the series. Left out: all configured
    destinations.
``priority``
    ``routine`` or ``stat``.
``completion``
    ``series`` (analyse when the series is complete) or ``study`` (wait until
    the whole study is complete and quiet).
``quiet_period_s``
    Seconds without a new instance before the series (or study) counts as
    complete, overriding ``completion.quiet_period_s``.
``final``
    When this rule matches, the rules after it are not evaluated.

Conditions
----------
A node of ``when`` is either a condition or exactly one of ``all: [...]``
(every node true; ``all: []`` is true), ``any: [...]`` (at least one true;
``any: []`` is false) and ``not: {...}``. A condition has exactly one subject
and exactly one operator:

* subject ``attribute``: a DICOM keyword (``SliceThickness``) or tag
  (``"(0018,0050)"`` or ``"00180050"``) of the series' first instance. Only
  top-level attributes are examined, not those inside sequences (such as the
  functional groups of enhanced multi-frame objects).
* subject ``association``: ``calling_ae`` or ``called_ae`` (AE titles) or
  ``peer_address`` (the sender's IP address).
* ``equals: VALUE``; ``in: [VALUE, ...]``; ``regex: PATTERN`` (Python ``re``,
  searched anywhere in the value, so anchor with ``^...$`` for a full match);
  ``range: {min: A, max: B}`` (numeric, both bounds inclusive, either may be
  left out); ``present: true`` (present and not empty) or ``present: false``
  (absent or empty).
* An attribute with several values (``ImageType``) satisfies an operator if
  any one of its values does. An absent or empty attribute satisfies only
  ``present: false``. Leading and trailing spaces of values never count.
* ``peer_address`` with ``equals``/``in`` compares IP addresses; entries may
  be networks in CIDR notation (``10.0.0.0/8``).
* Case: AE titles, and attributes of VR AE, CS, LO, SH, LT, ST, UT, UC and PN,
  compare without regard to case; all others (UI, DA, TM, numbers...) with
  regard to case. ``case_sensitive: true|false`` on a condition overrides
  this. ``equals``/``in`` on a numeric attribute (DS, IS, US, FL...) compare
  numbers, so ``SliceThickness equals 3`` matches ``"3.000000"``.

Combination
-----------
Rules are evaluated in order. Every matching rule applies, until a matching
rule with ``final: true``: the rules after it are not evaluated. The models of
all matching rules are run, each once; for a model asked for by several rules
the destinations are the union (first-seen order), the priority is ``stat`` if
any of those rules says so. The series waits for its whole study if any
matching rule says ``completion: study``; the quiet period is the longest
``quiet_period_s`` among the matching rules (the global one if none sets it).
A matching rule with no models still counts as a match. If no rule matches,
the ``fallback`` applies: its models (by default none: the series is stored
but not analysed) with its destinations, routine priority, series completion.

Matching follows DICOM PS3.4 C.2.2.2.1 ("Single Value Matching") in spirit:
the standard matches case-sensitively and lets an application match PN
case-insensitively; radnode extends that latitude to the text VRs above,
because scanners and sites spell descriptions and body parts inconsistently
(``case_sensitive: true`` restores the strict behaviour). That leading and
trailing spaces are not significant follows the VR definitions of DICOM
PS3.5 6.2. Values of Patient attributes (group 0010) and of PN attributes are
never quoted in reasons (they show as ``<withheld>``).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: The destination name that means "the AE that sent the series".
SENDER = "sender"
#: Stands for "all configured destinations" in :attr:`RouteTarget.destinations`.
ALL_DESTINATIONS = "*"
#: VRs whose values compare without regard to case by default.
CASE_INSENSITIVE_VRS = frozenset({"AE", "CS", "LO", "SH", "LT", "ST", "UT", "UC", "PN"})
#: VRs whose values ``equals``/``in`` compare as numbers.
NUMERIC_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
#: The operators of a condition, in the order they are named in messages.
OPERATORS = ("equals", "in", "regex", "range", "present")
#: The association subjects of a condition.
ASSOCIATION_SUBJECTS = ("calling_ae", "called_ae", "peer_address")

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_ALIASES = {"in_": "in", "all_": "all", "any_": "any", "not_": "not"}
_MAX_SHOWN = 64

Scalar = str | int | float
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Range(_Model):
    """Inclusive numeric bounds of a ``range`` condition.

    Attributes
    ----------
    min, max : float or None
        Lower and upper bound, in the attribute's own unit (e.g. mm for
        Slice Thickness); None leaves that side open. At least one is set.

    Raises
    ------
    pydantic.ValidationError
        If neither bound is set, or ``min`` is greater than ``max``.
    """

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {_num(self.min)} is greater than max {_num(self.max)}")
        return self

    def contains(self, value: float) -> bool:
        """True if ``min <= value <= max`` (an unset bound always holds)."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        low = "(-inf" if self.min is None else f"[{_num(self.min)}"
        high = "+inf)" if self.max is None else f"{_num(self.max)}]"
        return f"{low}, {high}"


class Node(_Model):
    """One node of a rule's ``when`` tree: a condition, or ``all``/``any``/``not``.

    A condition has exactly one subject (``attribute`` or ``association``)
    and exactly one operator (``equals``, ``in``, ``regex``, ``range``,
    ``present``), plus optional ``case_sensitive``. A boolean node has exactly
    one of ``all``, ``any`` and ``not`` and nothing else. In YAML and in
    :meth:`model_validate` the keys are ``in``, ``all``, ``any`` and ``not``;
    the Python attributes carry a trailing underscore.

    Attributes
    ----------
    attribute : str or None
        DICOM keyword, or tag as ``"(gggg,eeee)"`` or ``"ggggeeee"``.
    association : str or None
        ``calling_ae``, ``called_ae`` or ``peer_address``.
    equals : str, int, float or None
        The value to compare with.
    in_ : list or None
        Values to compare with (YAML key ``in``); for ``peer_address``,
        addresses or CIDR networks.
    regex : str or None
        Python regular expression, searched anywhere in the value.
    range : Range or None
        Inclusive numeric bounds.
    present : bool or None
        True: present and not empty; False: absent or empty.
    case_sensitive : bool or None
        Override the case rule of the subject's VR (None: the VR decides).
    all_, any_ : list[Node] or None
        Child nodes (YAML keys ``all`` and ``any``).
    not_ : Node or None
        The negated node (YAML key ``not``).

    Raises
    ------
    pydantic.ValidationError
        If the node's shape is wrong (no or several subjects or operators,
        ``all`` together with ``any``...), a keyword is not in the DICOM
        dictionary, a regular expression does not compile, or a
        ``peer_address`` entry is not an IP address or network.
    """

    attribute: str | None = None
    association: Literal["calling_ae", "called_ae", "peer_address"] | None = None
    equals: Scalar | None = None
    in_: list[Scalar] | None = Field(default=None, alias="in")
    regex: str | None = None
    range: Range | None = None
    present: bool | None = None
    case_sensitive: bool | None = None
    all_: list[Node] | None = Field(default=None, alias="all")
    any_: list[Node] | None = Field(default=None, alias="any")
    not_: Node | None = Field(default=None, alias="not")

    _tag: int | None = PrivateAttr(default=None)
    _patterns: tuple[re.Pattern[str], re.Pattern[str]] | None = PrivateAttr(default=None)
    _networks: tuple[IPNetwork, ...] | None = PrivateAttr(default=None)

    @field_validator("equals", "in_", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in items):
            raise ValueError("got a boolean (YAML reads yes/no/true/false/on/off as booleans); "
                             "quote the value, e.g. \"YES\"")
        return value

    @field_validator("in_")
    @classmethod
    def _non_empty(cls, value: list[Scalar] | None) -> list[Scalar] | None:
        if value is not None and not value:
            raise ValueError("in needs at least one value")
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> Node:
        booleans = [k for k, v in (("all", self.all_), ("any", self.any_), ("not", self.not_))
                    if v is not None]
        subjects = [k for k in ("attribute", "association") if getattr(self, k) is not None]
        operators = [k for k in OPERATORS if self._operand(k) is not None]
        if booleans:
            if len(booleans) > 1:
                raise ValueError("a node is a condition or exactly one of all, any, not; "
                                 f"got {', '.join(booleans)}")
            others = subjects + operators + (["case_sensitive"]
                                             if self.case_sensitive is not None else [])
            if others:
                raise ValueError(f"a node with {booleans[0]} cannot also have "
                                 f"{', '.join(others)}; put the condition inside it")
            return self
        if not subjects and not operators:
            raise ValueError("empty node: give a condition (attribute or association with one "
                             "of equals, in, regex, range, present) or one of all, any, not")
        if len(subjects) != 1:
            raise ValueError("condition needs exactly one of attribute, association; "
                             f"got {', '.join(subjects) or 'neither'}")
        if len(operators) != 1:
            raise ValueError(f"condition needs exactly one of {', '.join(OPERATORS)}; "
                             f"got {', '.join(operators) or 'none'}")
        operator = operators[0]
        values: list[Scalar] = [self.equals] if self.equals is not None else list(self.in_ or [])
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise ValueError(f"{operator} with an empty value never matches (values are "
                             "compared without leading and trailing spaces); use present: false")
        if self.case_sensitive is not None and operator in ("range", "present"):
            raise ValueError(f"case_sensitive does not apply to {operator}")
        if self.attribute is not None:
            self._tag = _resolve_attribute(self.attribute)
            if _dictionary_vr(self._tag) == "SQ" and operator != "present":
                raise ValueError(f"{self.subject} is a sequence (VR SQ); only present applies")
        elif operator == "range":
            raise ValueError(f"range does not apply to association {self.association}")
        elif self.association == "peer_address":
            if self.case_sensitive is not None:
                raise ValueError("case_sensitive does not apply to peer_address")
            if values:  # equals or in
                self._networks = tuple(_network(v) for v in values)
        if self.regex is not None:
            try:
                self._patterns = (re.compile(self.regex), re.compile(self.regex, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"invalid regular expression {self.regex!r}: {exc}") from exc
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {_ALIASES.get(k, k): v for k, v in data.items() if v is not None}

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        return ((k, v) for k, v in super().__repr_args__() if v is not None)

    def _operand(self, operator: str) -> Any:
        return self.in_ if operator == "in" else getattr(self, operator)

    @property
    def operator(self) -> str | None:
        """The condition's operator (``equals``...), None for a boolean node."""
        return next((k for k in OPERATORS if self._operand(k) is not None), None)

    @property
    def subject(self) -> str:
        """The subject as shown in reasons: keyword, ``(gggg,eeee)`` or association name."""
        if self._tag is not None:
            return keyword_for_tag(self._tag) or _tag_text(self._tag)
        return self.association or self.attribute or ""

    @property
    def tag(self) -> int | None:
        """The attribute's tag as an int, None for other nodes."""
        return self._tag

    def children(self) -> list[Node]:
        """The direct child nodes (empty for a condition)."""
        if self.not_ is not None:
            return [self.not_]
        return list(self.all_ if self.all_ is not None else self.any_ or [])

    def walk(self) -> Iterator[Node]:
        """Yield this node and all nodes below it, depth first."""
        yield self
        for child in self.children():
            yield from child.walk()

    def check(self, facts: SeriesFacts) -> tuple[bool, str]:
        """Evaluate this node on one series.

        Parameters
        ----------
        facts : SeriesFacts
            The series' header and association.

        Returns
        -------
        tuple[bool, str]
            Whether the node holds, and why (for ``all``: the first failed
            child; for ``any``: every failed branch).
        """
        if self.all_ is not None:
            reasons = []
            for child in self.all_:
                ok, why = child.check(facts)
                if not ok:
                    return False, why
                reasons.append(why)
            return True, " and ".join(reasons) if reasons else "all: [] always holds"
        if self.any_ is not None:
            reasons = []
            for child in self.any_:
                ok, why = child.check(facts)
                if ok:
                    return True, why
                reasons.append(f"({why})")
            if not reasons:
                return False, "any: [] never holds"
            return False, f"no branch of any(...) holds: {' or '.join(reasons)}"
        if self.not_ is not None:
            ok, why = self.not_.check(facts)
            return (False, f"not(...) failed: {why}") if ok else (True, f"not(...): {why}")
        return self._check_condition(facts)

    # -- one condition ------------------------------------------------------
    def _check_condition(self, facts: SeriesFacts) -> tuple[bool, str]:
        name = self.subject
        if self._tag is not None:
            vr, values, exists, withheld = _attribute_values(facts.header, self._tag)
        else:
            raw = getattr(facts, self.association or "", "").strip()
            vr, values, exists, withheld = "AE", [raw] if raw else [], bool(raw), False
        shown = "<withheld>" if withheld else _show(values)
        missing = f"{name} is absent" if not exists else f"{name} is empty"
        if self.present is not None:
            if self.present:
                return (True, f"{name} is present") if values else (False, missing)
            return (False, f"{name} is present ({shown})") if values else (True, missing)
        if not values:
            return False, missing
        if self.range is not None:
            return self._check_range(name, values, shown)
        if self._patterns is not None:
            pattern = self._patterns[0 if self._case_sensitive(vr) else 1]
            if any(pattern.search(v) for v in values):
                return True, f"{name} {shown} matches /{self.regex}/"
            return False, f"{name} {shown} does not match /{self.regex}/"
        if self._networks is not None:
            return self._check_address(values[0])
        expected = [self.equals] if self.equals is not None else list(self.in_ or [])
        case_sensitive = self._case_sensitive(vr)
        numeric = _is_numeric_vr(vr)
        hit = any(_equal(v, e, case_sensitive=case_sensitive, numeric=numeric)
                  for v in values for e in expected)
        if self.equals is not None:
            wanted = _literal(self.equals)
            if len(values) == 1:
                return (True, f"{name} is {shown}") if hit else (
                    False, f"{name} is {shown}, not equal to {wanted}")
            return (True, f"{name} {shown} includes {wanted}") if hit else (
                False, f"{name} is {shown}, no value equal to {wanted}")
        listed = "[" + ", ".join(str(e) for e in expected) + "]"
        return (True, f"{name} is {shown}, in {listed}") if hit else (
            False, f"{name} is {shown}, not in {listed}")

    def _check_range(self, name: str, values: list[str], shown: str) -> tuple[bool, str]:
        assert self.range is not None
        numbers: list[float] = []
        for value in values:
            try:
                numbers.append(float(value))
            except ValueError:
                continue
        if not numbers:
            return False, f"{name} {shown} is not a number"
        text = "\\".join(repr(n) for n in numbers)
        if any(self.range.contains(n) for n in numbers):
            return True, f"{name} {text} in {self.range}"
        return False, f"{name} {text} not in {self.range}"

    def _check_address(self, text: str) -> tuple[bool, str]:
        assert self._networks is not None
        listed = "[" + ", ".join(_network_text(n) for n in self._networks) + "]"
        try:
            address: IPAddress = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            return False, f"peer_address {text!r} is not an IP address"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self._networks):
            return True, f"peer_address {text!r} is in {listed}"
        return False, f"peer_address {text!r} is not in {listed}"

    def _case_sensitive(self, vr: str) -> bool:
        if self.case_sensitive is not None:
            return self.case_sensitive
        return not any(part in CASE_INSENSITIVE_VRS for part in vr.split(" or "))


Node.model_rebuild()


class Rule(_Model):
    """One routing rule: when a series matches, run these models and send there.

    Attributes
    ----------
    name : str
        Unique name, 1-64 characters of ``A-Z a-z 0-9 . _ -``.
    when : Node or None
        The condition tree; None matches every series.
    models : list[str]
        Models (declared under ``models:``) to run; may be empty.
    destinations : list[str] or None
        Destination names, or ``sender``; None: all configured destinations.
    priority : str
        ``routine`` or ``stat``.
    completion : str
        ``series`` or ``study`` (wait for the whole study).
    quiet_period_s : float or None
        Seconds without a new instance before the series (or study) is
        complete; None uses ``completion.quiet_period_s``.
    final : bool
        When this rule matches, later rules are not evaluated.

    Raises
    ------
    pydantic.ValidationError
        On an invalid name, an unknown key or an invalid condition.
    """

    name: str
    when: Node | None = None
    models: list[str]
    destinations: list[str] | None = None
    priority: Literal["routine", "stat"] = "routine"
    completion: Literal["series", "study"] = "series"
    quiet_period_s: float | None = Field(default=None, gt=0)
    final: bool = False

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"rule name {value!r} must be 1-64 characters of letters, digits, "
                             "'.', '_' and '-'")
        return value

    def check(self, facts: SeriesFacts) -> tuple[bool, str]:
        """Evaluate ``when`` on one series: (matched, reason)."""
        if self.when is None:
            return True, "no when: matches every series"
        return self.when.check(facts)


class Fallback(_Model):
    """What applies to a series that no rule matched.

    Attributes
    ----------
    models : list[str]
        Models to run; the default, empty, means "store, do not analyse".
    destinations : list[str] or None
        As for :class:`Rule`; None (the default): all configured destinations.
    """

    models: list[str] = Field(default_factory=list)
    destinations: list[str] | None = None


@dataclass(frozen=True)
class SeriesFacts:
    """What rules can test about one received series.

    Attributes
    ----------
    header : pydicom.dataset.Dataset
        The series' first instance, read without Pixel Data (at least the
        attributes named by :func:`header_keywords`).
    calling_ae : str
        AE title of the peer that sent the series.
    called_ae : str
        AE title the peer addressed (radnode's own).
    peer_address : str
        IP address of the peer.
    """

    header: Dataset
    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one rule for one series.

    Attributes
    ----------
    rule : Rule
        The rule.
    matched : bool
        Whether it matched (False when not evaluated).
    evaluated : bool
        False when an earlier ``final`` rule matched.
    reason : str
        For a match, what matched; for a miss, the first condition that failed
        (for ``any``, the reasons of all branches).
    """

    rule: Rule
    matched: bool
    evaluated: bool
    reason: str


@dataclass(frozen=True)
class RouteTarget:
    """One model to run on a series, and where its results go.

    Attributes
    ----------
    model : str
        Model name.
    destinations : tuple[str, ...]
        Destination names as written in the rules, not resolved: ``sender``
        is the sending AE, ``*`` (:data:`ALL_DESTINATIONS`) all configured
        destinations.
    priority : str
        ``stat`` or ``routine``.
    rules : tuple[str, ...]
        Names of the rules that asked for this model (``fallback`` for the
        fallback).
    """

    model: str
    destinations: tuple[str, ...]
    priority: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class Routing:
    """What to do with one series: the combination of all matching rules.

    Attributes
    ----------
    targets : tuple[RouteTarget, ...]
        Models to run, in first-seen order; empty: store, do not analyse.
    matched : tuple[str, ...]
        Names of the matching rules, or ``("fallback",)``.
    scope : str
        ``series``, or ``study`` if any matching rule waits for the study.
    quiet_period_s : float or None
        Longest ``quiet_period_s`` (seconds) among the matching rules; None if
        none sets one (use ``completion.quiet_period_s``).
    results : tuple[RuleResult, ...]
        One per rule, in order.
    """

    targets: tuple[RouteTarget, ...]
    matched: tuple[str, ...]
    scope: str
    quiet_period_s: float | None
    results: tuple[RuleResult, ...]


def header_keywords(rules: Sequence[Rule], fallback: Fallback | None = None) -> set[str]:
    """Attributes the rules test, for ``pydicom.dcmread(specific_tags=...)``.

    Parameters
    ----------
    rules : sequence of Rule
        The configured rules.
    fallback : Fallback, optional
        Accepted for symmetry; the fallback tests no attribute.

    Returns
    -------
    set[str]
        DICOM keywords, and ``ggggeeee`` hex strings for tags without one
        (private tags); always includes ``Modality``.
    """
    del fallback
    names = {"Modality"}
    for rule in rules:
        if rule.when is None:
            continue
        for node in rule.when.walk():
            if node.tag is not None:
                names.add(keyword_for_tag(node.tag) or f"{node.tag:08X}")
    return names


def evaluate(rules: Sequence[Rule], facts: SeriesFacts) -> list[RuleResult]:
    """Evaluate the rules in order on one series.

    Parameters
    ----------
    rules : sequence of Rule
        The configured rules.
    facts : SeriesFacts
        The series' header and association.

    Returns
    -------
    list[RuleResult]
        One per rule, in order; rules after a matching ``final`` rule are
        not evaluated.
    """
    results: list[RuleResult] = []
    stopped_by: str | None = None
    for rule in rules:
        if stopped_by is not None:
            results.append(RuleResult(rule, matched=False, evaluated=False,
                                      reason=f"not evaluated: final rule {stopped_by!r} matched"))
            continue
        matched, reason = rule.check(facts)
        results.append(RuleResult(rule, matched=matched, evaluated=True, reason=reason))
        if matched and rule.final:
            stopped_by = rule.name
    return results


def route(rules: Sequence[Rule], fallback: Fallback, facts: SeriesFacts) -> Routing:
    """Decide which models run on a series and where their results go.

    See the module documentation ("Combination") for how matching rules
    combine.

    Parameters
    ----------
    rules : sequence of Rule
        The configured rules.
    fallback : Fallback
        What applies when no rule matches.
    facts : SeriesFacts
        The series' header and association.

    Returns
    -------
    Routing
        Targets, matching rules, completion scope and quiet period.
    """
    results = tuple(evaluate(rules, facts))
    matched = [r.rule for r in results if r.matched]
    if not matched:
        destinations = _destination_names(fallback.destinations)
        targets = tuple(RouteTarget(model=m, destinations=destinations, priority="routine",
                                    rules=("fallback",)) for m in dict.fromkeys(fallback.models))
        return Routing(targets=targets, matched=("fallback",), scope="series",
                       quiet_period_s=None, results=results)
    merged: dict[str, tuple[dict[str, None], bool, dict[str, None]]] = {}
    for rule in matched:
        for model in rule.models:
            sends, stat, names = merged.setdefault(model, ({}, False, {}))
            sends.update(dict.fromkeys(_destination_names(rule.destinations)))
            names[rule.name] = None
            merged[model] = (sends, stat or rule.priority == "stat", names)
    targets = tuple(RouteTarget(model=model, destinations=tuple(sends),
                                priority="stat" if stat else "routine", rules=tuple(names))
                    for model, (sends, stat, names) in merged.items())
    quiet = [r.quiet_period_s for r in matched if r.quiet_period_s is not None]
    return Routing(
        targets=targets,
        matched=tuple(r.name for r in matched),
        scope="study" if any(r.completion == "study" for r in matched) else "series",
        quiet_period_s=max(quiet) if quiet else None,
        results=results,
    )


def default_rules() -> list[Rule]:
    """The rules used when the configuration has none.

    Returns
    -------
    list[Rule]
        ``ct``: Modality CT runs ``radnode-builtin-ct``; ``mr``: Modality MR
        runs ``radnode-builtin-mr``; both send to all destinations, routine,
        per series.
    """
    return [
        Rule.model_validate({"name": "ct", "when": {"attribute": "Modality", "equals": "CT"},
                             "models": ["radnode-builtin-ct"]}),
        Rule.model_validate({"name": "mr", "when": {"attribute": "Modality", "equals": "MR"},
                             "models": ["radnode-builtin-mr"]}),
    ]


def validate_rules(rules: Sequence[Rule], fallback: Fallback, *, models: set[str],
                   destinations: set[str]) -> list[str]:
    """Check the rules against the declared models and configured destinations.

    Parameters
    ----------
    rules : sequence of Rule
        The configured rules (each already valid on its own).
    fallback : Fallback
        The fallback.
    models : set[str]
        Names of the declared models.
    destinations : set[str]
        Names of the configured destinations.

    Returns
    -------
    list[str]
        One message per problem, naming the key (``rules[2] (chest-ct): ...``);
        empty if all is well. Checked: repeated rule names, undeclared
        models, unknown destination names (``sender`` is always known).
    """
    problems: list[str] = []
    declared = ", ".join(sorted(models)) or "none"
    configured = ", ".join(sorted(destinations)) or "none"
    first_use: dict[str, int] = {}

    def check_names(where: str, wanted_models: list[str], wanted: list[str] | None) -> None:
        for model in dict.fromkeys(wanted_models):
            if model not in models:
                problems.append(f"{where}: model {model!r} is not declared under models "
                                f"(declared: {declared})")
        for name in dict.fromkeys(wanted or []):
            if name != SENDER and name not in destinations:
                problems.append(f"{where}: destination {name!r} is not configured under "
                                f"destinations (configured: {configured}; or {SENDER!r})")

    for index, rule in enumerate(rules):
        where = f"rules[{index}] ({rule.name})"
        if rule.name in first_use:
            problems.append(f"{where}: name {rule.name!r} is already used by "
                            f"rules[{first_use[rule.name]}]; each rule name once")
        else:
            first_use[rule.name] = index
        check_names(where, rule.models, rule.destinations)
    check_names("fallback", fallback.models, fallback.destinations)
    return problems


# -- helpers ------------------------------------------------------------------
def _num(value: float) -> str:
    return f"{value:g}"


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _is_numeric_vr(vr: str) -> bool:
    return any(part in NUMERIC_VRS for part in vr.split(" or "))


def _resolve_attribute(text: str) -> int:
    stripped = text.strip()
    match = _TAG_RE.match(stripped)
    if match:
        return int(match[1] + match[2], 16)
    tag = tag_for_keyword(stripped)
    if tag is None:
        close = difflib.get_close_matches(stripped, keyword_dict, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{text} is not a DICOM keyword{hint}; give a keyword such as "
                         "Modality or a tag such as (0018,0050)")
    return tag


def _network(value: Scalar) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"peer_address: {value!r} is not an IP address or CIDR network "
                         f"({exc})") from exc


def _network_text(network: IPNetwork) -> str:
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def _attribute_values(header: Dataset, tag: int) -> tuple[str, list[str], bool, bool]:
    """VR, non-empty stripped string values, whether present, whether withheld."""
    if tag not in header:
        vr = _dictionary_vr(tag)
        return vr, [], False, False
    element = header[tag]
    vr = str(element.VR or _dictionary_vr(tag))
    withheld = tag >> 16 == 0x0010 or vr == "PN"
    value = element.value
    if vr == "SQ":
        return vr, (["(sequence)"] if value else []), True, False
    if isinstance(value, bytes | bytearray):
        value = value.decode("latin-1").split("\\")
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    strings: list[str] = []
    for item in items:
        if item is None:
            continue
        text = item.decode("latin-1") if isinstance(item, bytes) else str(item)
        text = text.strip(" \x00")
        if text:
            strings.append(text)
    return vr, strings, True, withheld


def _show(values: list[str]) -> str:
    text = "\\".join(values)
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN - 3] + "..."
    return f"'{text}'"


def _literal(value: Scalar) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _equal(value: str, expected: Scalar, *, case_sensitive: bool, numeric: bool) -> bool:
    if numeric or not isinstance(expected, str):
        try:
            return float(value) == float(expected)
        except ValueError:
            pass
    wanted = str(expected).strip()
    return value == wanted if case_sensitive else value.casefold() == wanted.casefold()


def _destination_names(names: list[str] | None) -> tuple[str, ...]:
    return (ALL_DESTINATIONS,) if names is None else tuple(dict.fromkeys(names))
