"""Byte-level fuzzing of the C-STORE SCP with real files, over real associations.

Hypothesis mutates the data set of real files (the File Meta stays valid, so pynetdicom's SCU
can still pick a presentation context): flipped, overwritten, inserted, deleted and
duplicated bytes, truncation, and overwritten lengths, VRs and tags of top-level elements.
Every case gets a fresh SOP Instance UID (same length, replaced in the meta and data set), is
sent raw on one association (re-associated if the SCP aborted it) to one SCP for the whole
test, and must keep the invariants of :mod:`tests.unit.test_hostile_input`:

* a status comes back, or the SCP aborts the association (both are counted);
* 0x0000: a row and a spool file whose data set is byte-identical to the bytes sent;
* anything else: a failure status (0xA7xx, 0xA9xx, 0xCxxx) and neither row nor file;
* no file without a row, no row without a file, no ``.incoming-*`` file, nothing outside the
  spool, and the SCP still answers C-ECHO and accepts new associations.

Bounded and reproducible: ``derandomize=True``, no example database. The summary line (cases
and statuses) is printed even without ``-s``.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.unit.test_hostile_input import (
    CT_SMALL,
    DEFLATED,
    ENHANCED_MR,
    MR_BIG_ENDIAN,
    MR_IMPLICIT,
    MR_JLS,
    MR_RLE,
    UNDEFINED,
    Element,
    Node,
    Part10,
    Sender,
    assert_consistent,
    assert_left_nothing,
    assert_stored,
    chunked_send,
    fresh_uid,
    is_failure,
    running_node,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

MAX_EXAMPLES = 300
DIMSE_TIMEOUT_S = 10
#: Real files of every encoding family: explicit/implicit LE, explicit BE, encapsulated
#: (RLE, JPEG-LS), deflated, a multi-frame enhanced MR, SEG and SR (deep sequences), a
#: label-map SEG and the first 512x512 slice of the pancreas CT series.
BASES = [
    CT_SMALL,
    MR_IMPLICIT,
    MR_BIG_ENDIAN,
    MR_RLE,
    MR_JLS,
    DEFLATED,
    ENHANCED_MR,
    "seg_sr/highdicom/seg_image_ct_binary.dcm",
    "seg_sr/highdicom/sr_document.dcm",
    "seg_sr/dcmqi_sr_tid1500/sr.dcm",
    "seg_sr/dcmqi_labelmap_seg/sparse-labelmap-noppv.dcm",
    "ct_abdomen_pancreas_tcia/1-001.dcm",
]
VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD",
       "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI",
       "UL", "UN", "UR", "US", "UT", "UV", "ZZ", "\0\0", "\xff\xff"]

# Positions: mostly in the first 2 KiB (UIDs, structure), sometimes anywhere.
POSITION = st.one_of(st.integers(0, 2047), st.integers(0, 2**31 - 1))
LENGTH = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xFFFE, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, UNDEFINED]),
    st.integers(0, 0xFFFFFFFF),
)
ELEMENT_OP = st.one_of(
    st.tuples(st.just("length"), st.integers(0, 9999), LENGTH),
    st.tuples(st.just("nudge length"), st.integers(0, 9999), st.integers(-16, 16)),
    st.tuples(st.just("vr"), st.integers(0, 9999), st.sampled_from(VRS)),
    st.tuples(st.just("tag"), st.integers(0, 9999), st.integers(0, 0xFFFFFFFF)),
)
BYTE_OP = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(1, 255)),
    st.tuples(st.just("set"), POSITION, st.integers(0, 255)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 64)),
    st.tuples(st.just("duplicate"), POSITION, st.integers(1, 256)),
)


@dataclass(frozen=True)
class Case:
    base: int
    element_ops: tuple[tuple[object, ...], ...]
    byte_ops: tuple[tuple[object, ...], ...]
    on_the_wire: bool  # deflated bases: byte operations on the compressed stream


@st.composite
def cases(draw: st.DrawFn) -> Case:
    base = draw(st.sampled_from(range(len(BASES))))
    element_ops = draw(st.lists(ELEMENT_OP, max_size=2))
    byte_ops = draw(st.lists(BYTE_OP, min_size=0 if element_ops else 1, max_size=3))
    return Case(base, tuple(element_ops), tuple(byte_ops), draw(st.booleans()))


def apply_element_op(part: Part10, data: bytearray, elements: list[Element],
                     op: tuple[object, ...]) -> str:
    kind, index, value = op
    assert isinstance(index, int)
    element = elements[index % len(elements)]
    width = element.length_size
    limit = 0xFFFF if width == 2 else 0xFFFFFFFF
    if kind in ("length", "nudge length"):
        assert isinstance(value, int)
        new = value if kind == "length" else element.length + value
        data[element.length_at:element.length_at + width] = struct.pack(
            part.endian + ("H" if width == 2 else "L"), new & limit)
        return str(kind)
    if kind == "vr" and element.vr is not None:
        assert isinstance(value, str)
        data[element.header + 4:element.header + 6] = value.encode("latin-1")
        return "vr"
    number = value if kind == "tag" else index  # "vr" in implicit VR: overwrite the tag
    assert isinstance(number, int)
    data[element.header:element.header + 4] = struct.pack(
        part.endian + "HH", (number >> 16) & 0xFFFF, number & 0xFFFF)
    return "tag"


def apply_byte_op(data: bytes, op: tuple[object, ...]) -> bytes:
    kind, position = op[0], op[1]
    assert isinstance(position, int)
    if not data:
        return bytes(op[2]) if kind == "insert" else data  # type: ignore[arg-type]
    at = position % len(data)
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ int(op[2])]) + data[at + 1:]  # type: ignore
    if kind == "set":
        return data[:at] + bytes([int(op[2])]) + data[at + 1:]  # type: ignore[call-overload]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + bytes(op[2]) + data[at:]  # type: ignore[arg-type]
    count = int(op[2])  # type: ignore[call-overload]
    if kind == "delete":
        return data[:at] + data[at + count:]
    assert kind == "duplicate"
    return data[:at + count] + data[at:at + count] + data[at + count:]


def case_uid(number: int, length: int) -> str:
    """A deterministic UID of ``length`` characters for case ``number`` (reproducible runs)."""
    return f"2.25.9{number:0{length - 6}d}"


def tiles(part: Part10) -> bool:
    """True if the top-level elements cover the data set exactly, end to end.

    A lower bound of well-formedness (nested items are not checked): a data set cut inside an
    element, or with a length running past the end, fails it.
    """
    try:
        data = part.dataset_bytes
        elements = sorted(part.elements().values(), key=lambda e: e.header)
    except Exception:
        return False
    if not elements:
        return not data
    if elements[0].header != 0:
        return False
    ends = [e.header for e in elements[1:]] + [len(data)]
    return all(e.length == UNDEFINED or e.value + e.length == end
               for e, end in zip(elements, ends, strict=True))


def mutate(part: Part10, elements: list[Element], case: Case) -> tuple[Part10, list[str]]:
    """Apply the case's operations to the data set; return the mutated part and their names."""
    names: list[str] = []
    data = bytearray(part.dataset_bytes)
    for op in case.element_ops:
        names.append(apply_element_op(part, data, elements, op))
    wire = part.syntax.is_deflated and case.on_the_wire
    dataset = bytes(data)
    if not wire:
        for op in case.byte_ops:
            dataset = apply_byte_op(dataset, op)
            names.append(str(op[0]))
        return part.with_dataset(dataset), names
    body = part.with_dataset(dataset).body
    for op in case.byte_ops:
        body = apply_byte_op(body, op)
        names.append(f"{op[0]} (deflated)")
    return part.with_body(body), names


@dataclass
class Tally:
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    comments: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    by_base: Counter[str] = field(default_factory=Counter)
    aborted: int = 0
    success_not_tiling: int = 0
    new_associations_checked: int = 0
    slowest_s: float = 0.0

    def line(self, elapsed_s: float, associations: int) -> str:
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(self.statuses.items()))
        return (f"fuzz_scp: {self.cases} cases in {elapsed_s:.1f} s on {len(BASES)} real files; "
                f"statuses: {statuses}; aborted by the SCP: {self.aborted}; "
                f"associations opened by the sender: {associations}; "
                f"0x0000 for a data set whose elements do not tile its bytes: "
                f"{self.success_not_tiling}; slowest case {self.slowest_s:.2f} s")


@pytest.fixture
def fuzz_node(tmp_path: Path) -> Iterator[Node]:
    with chunked_send(), running_node(tmp_path / "root") as node:
        yield node


def test_fuzz_scp(fuzz_node: Node, test_data_dir: Path, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    node = fuzz_node
    bases = [Part10.read(test_data_dir / relative) for relative in BASES]
    base_elements = [list(p.elements().values()) for p in bases]
    contexts = [(CTImageStorage, ExplicitVRLittleEndian)] + [(p.sop_class, p.syntax)
                                                              for p in bases]
    sender = Sender(node.port, contexts, tmp_path / "scu")
    tally = Tally()
    started = time.monotonic()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
              print_blob=False)
    @given(case=cases())
    def run(case: Case) -> None:
        base = bases[case.base]
        part = base.renamed(case_uid(tally.cases, len(base.sop_instance)))
        mutated, names = mutate(part, base_elements[case.base], case)
        tally.cases += 1
        tally.operations.update(names)
        tally.by_base[base.name] += 1

        t0 = time.monotonic()
        status = sender.store(mutated)
        took = time.monotonic() - t0
        tally.slowest_s = max(tally.slowest_s, took)

        if status is None:
            assert took < DIMSE_TIMEOUT_S - 1, "no response: the SCP hung, did not abort"
            assert sender.assoc is not None
            deadline = time.monotonic() + 5
            while sender.assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sender.assoc.is_aborted, "no response and no abort"
            tally.aborted += 1
            tally.statuses["aborted"] += 1
            assert_consistent(node)
        elif status == 0x0000:
            tally.statuses["0x0000"] += 1
            assert_stored(node, mutated)
            tally.success_not_tiling += not tiles(mutated)
        else:
            tally.statuses[f"0x{status:04X}"] += 1
            tally.comments[sender.last_comment] += 1
            assert is_failure(status), f"0x{status:04X} is neither success nor failure"
            assert_left_nothing(node, mutated)

        # Still alive: C-ECHO on this association (re-associating if it was aborted) ...
        assert sender.echo() == 0x0000
        # ... and, now and then, on a brand-new association.
        if tally.cases % 25 == 0:
            other = Sender(node.port, contexts[:1], tmp_path / "other")
            assert other.echo() == 0x0000
            other.release()
            tally.new_associations_checked += 1

    try:
        run()
    finally:
        sender.release()
    elapsed = time.monotonic() - started

    # After the storm: a valid instance is stored, the spool and the table agree.
    healthy = bases[0].renamed(fresh_uid(len(bases[0].sop_instance)))
    after = Sender(node.port, contexts[:1], tmp_path / "after")
    try:
        assert after.store(healthy) == 0x0000
    finally:
        after.release()
    assert_stored(node, healthy)
    assert_consistent(node)

    with capsys.disabled():
        print()
        print(tally.line(elapsed, sender.associations))
        print("fuzz_scp: error comments:",
              ", ".join(f"{k!r} x{v}" for k, v in tally.comments.most_common()))
        print("fuzz_scp: operations:",
              ", ".join(f"{k} x{v}" for k, v in tally.operations.most_common()))
        print("fuzz_scp: cases per file:",
              ", ".join(f"{k} x{v}" for k, v in tally.by_base.most_common()))
    assert tally.cases >= MAX_EXAMPLES // 2
    # A handler that raised is answered 0xC211 by pynetdicom (not one of the handler's own).
    assert "0xC211" not in tally.statuses
