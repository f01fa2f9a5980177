"""The label table: for each label value its structure name, display colour and SNOMED CT coding.

Names follow the TotalSegmentator v2 ``total`` order (the channel order of CT-FM's whole-body model); codes and
colours come from TotalSegmentator's SNOMED mapping (bundled, Apache-2.0).  Laterality is a modifier of the type
code (SCT 7771000 Left, 24028007 Right), so left and right structures stay distinguishable in DICOM-SEG.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

_DATA = resources.files("ctfm_engine") / "data"


@dataclass(frozen=True)
class Code:
    scheme: str  # "SCT" = SNOMED CT
    value: str
    meaning: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color_rgb: tuple[int, int, int]
    category: Code | None = None
    type: Code | None = None
    type_modifier: Code | None = None  # laterality
    region: Code | None = None
    region_modifier: Code | None = None

    @property
    def laterality(self) -> str | None:
        for code in (self.type_modifier, self.region_modifier):
            if code is not None and code.meaning in ("Left", "Right"):
                return code.meaning.lower()
        return None

    def as_dict(self) -> dict:
        codes = {key: None if code is None else code.as_dict() for key, code in (
            ("category", self.category), ("type", self.type), ("type_modifier", self.type_modifier),
            ("region", self.region), ("region_modifier", self.region_modifier))}
        return {"value": self.value, "name": self.name, "color_rgb": list(self.color_rgb),
                "laterality": self.laterality, "snomed": codes}


def totalsegmentator_names() -> dict[int, str]:
    """Channel -> structure name of the 117 TotalSegmentator v2 classes (0 is background)."""
    path = _DATA / "totalsegmentator_v2_total.json"
    return {int(key): name for key, name in json.loads(path.read_text()).items()}


@lru_cache(maxsize=1)
def _snomed_rows() -> dict[str, dict[str, str]]:
    with (_DATA / "totalsegmentator_snomed_mapping.csv").open(newline="") as handle:
        return {row["Structure"]: row for row in csv.DictReader(handle)}


def _code(row: dict[str, str], sequence: str) -> Code | None:
    value = row.get(f"{sequence}.CodeValue", "").strip()
    if not value:
        return None
    return Code(row[f"{sequence}.CodingSchemeDesignator"].strip(), value, row[f"{sequence}.CodeMeaning"].strip())


def _fallback_color(value: int) -> tuple[int, int, int]:
    """A stable, distinguishable colour for a label without a mapping row (golden-angle hues)."""
    import colorsys

    red, green, blue = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.65, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def label_table(names: dict[int, str]) -> dict[int, Label]:
    """Label value -> Label for every named structure; codes and colours where the mapping knows the name."""
    rows = _snomed_rows()
    table = {}
    for value, name in sorted(names.items()):
        row = rows.get(name)
        if row is None:
            table[value] = Label(value, name, _fallback_color(value))
            continue
        red, green, blue = (int(part) for part in row["DicomRGBColor"].split(","))
        table[value] = Label(
            value, name, (red, green, blue),
            category=_code(row, "SegmentedPropertyCategoryCodeSequence"),
            type=_code(row, "SegmentedPropertyTypeCodeSequence"),
            type_modifier=_code(row, "SegmentedPropertyTypeModifierCodeSequence"),
            region=_code(row, "AnatomicRegionSequence"),
            region_modifier=_code(row, "AnatomicRegionModifierSequence"),
        )
    return table
