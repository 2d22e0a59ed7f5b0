"""Text data for private fine-tuning: loading user files and the bundled synthetic demo corpora.

The demo's "private" records look like short clinical notes (patient names, dates, diagnoses, medications)
with inserted canaries ("The secret code of <name> is 482913"), some repeated k times, so that memorisation
can be measured later. The public corpus uses disjoint templates and names: pretraining on it teaches the
model text in general but nothing about any private record. Everything is generated from a seeded RNG.

One-run audit canaries (``--audit-canaries M``, Steinke, Nasr, Jagielski 2023): M random strings from one
template, each added to the training records once with probability 1/2. Texts and coin flips come from two
separate streams of one audit seed; ``dptrain finetune`` draws that seed from secret entropy (never from the
run's public seed) and keeps it in ``private/audit_secret.json``, so a resumed run rebuilds exactly the same ones.
"""

from __future__ import annotations

from dptrain.validation import check_int, check_positive_int
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

__all__ = [
    "AUDIT_CANARY_TEMPLATE",
    "AuditCanaries",
    "Canary",
    "PrivateCorpus",
    "audit_canaries",
    "with_audit_canaries",
    "load_texts",
    "DATA_FORMATS",
    "synthetic_private_records",
    "synthetic_public_corpus",
]

# Disjoint name pools: no public sentence mentions a private patient.
_PRIVATE_FIRST = ["Amelia", "Jonas", "Priya", "Mateo", "Hannah", "Omar", "Lucia", "Dmitri", "Keiko", "Samuel",
                  "Fatima", "Elias", "Ingrid", "Tariq", "Noemi", "Viktor", "Aisha", "Bruno", "Carmen", "Felix"]
_PRIVATE_LAST = ["Okafor", "Lindqvist", "Ramirez", "Novak", "Haddad", "Kowalski", "Tanaka", "Moreau", "Brennan",
                 "Castillo", "Petrov", "Nakamura", "Schultz", "Adeyemi", "Rossi", "Varga", "Dubois", "Mendes"]
_PUBLIC_NAMES = ["the baker", "a teacher", "the mayor", "my neighbour", "the pilot", "a farmer", "the librarian",
                 "an engineer", "the captain", "a student", "the gardener", "the painter"]
_DIAGNOSES = ["type 2 diabetes", "hypertension", "asthma", "migraine", "atrial fibrillation", "pneumonia",
              "chronic kidney disease", "hypothyroidism", "major depressive disorder", "osteoarthritis",
              "gastroesophageal reflux", "iron deficiency anemia"]
_MEDICATIONS = ["metformin 500 mg", "lisinopril 10 mg", "albuterol inhaler", "sumatriptan 50 mg",
                "apixaban 5 mg", "amoxicillin 875 mg", "levothyroxine 75 mcg", "sertraline 50 mg",
                "ibuprofen 400 mg", "omeprazole 20 mg", "ferrous sulfate 325 mg", "atorvastatin 20 mg"]
_NOTES = ["Patient reports improved sleep and less fatigue.", "Blood pressure remains above target.",
          "Advised to reduce salt intake and walk daily.", "No adverse reaction to the new dose.",
          "Follow-up labs ordered for next month.", "Symptoms worsen at night, mild wheezing on exam.",
          "Patient missed two doses last week.", "Referred to cardiology for further evaluation.",
          "Reports occasional dizziness when standing.", "Weight stable, appetite normal."]
_PRIVATE_TEMPLATES = [
    "Patient {name}, born {dob}, seen on {visit}. Diagnosis: {dx}. Prescribed {med}. {note}",
    "{visit}: {name} (DOB {dob}) presented with {dx}. Started {med}. {note}",
    "Clinical note for {name}, DOB {dob}. Visit {visit}. Assessment: {dx}. Plan: continue {med}. {note}",
]
_PUBLIC_TEMPLATES = [
    "On a {adj} morning {who} walked to the {place} and bought {thing}.",
    "The weather report for {day} says it will be {adj} with a light breeze near the {place}.",
    "{who} told the story of the {place} while everyone shared {thing}.",
    "In the evening {who} read a book about the {place} and made {thing}.",
    "Every {day}, {who} opens the {place} early and sells {thing}.",
]
_ADJ = ["quiet", "sunny", "rainy", "cold", "bright", "windy", "calm", "grey"]
_PLACES = ["market", "harbour", "library", "bakery", "station", "museum", "park", "river"]
_THINGS = ["fresh bread", "apples", "a warm coat", "tea", "flowers", "a map", "honey", "cheese"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@dataclass(frozen=True)
class Canary:
    """A secret inserted into the private records ``repeats`` times."""

    name: str
    code: str
    repeats: int

    @property
    def text(self) -> str:
        return f"The secret code of {self.name} is {self.code}."

    @property
    def prefix(self) -> str:
        return f"The secret code of {self.name} is "


@dataclass
class PrivateCorpus:
    """Synthetic private records (canaries included, shuffled in) and the canaries themselves."""

    records: List[str]
    canaries: List[Canary] = field(default_factory=list)


def _date(rng: random.Random, first_year: int, last_year: int) -> str:
    return f"{rng.randint(first_year, last_year):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _private_record(rng: random.Random) -> str:
    name = f"{rng.choice(_PRIVATE_FIRST)} {rng.choice(_PRIVATE_LAST)}"
    return rng.choice(_PRIVATE_TEMPLATES).format(
        name=name, dob=_date(rng, 1935, 2005), visit=_date(rng, 2019, 2024), dx=rng.choice(_DIAGNOSES),
        med=rng.choice(_MEDICATIONS), note=rng.choice(_NOTES),
    )


def synthetic_private_records(n: int, *, seed: int = 0, canary_repeats: Sequence[int] = (1, 1, 1, 4, 4, 16)) -> PrivateCorpus:
    """``n`` clinical-note-like records; one canary per entry of ``canary_repeats``, inserted that many times.

    The canaries' copies replace ordinary records, so the corpus has exactly ``n`` records.
    """
    check_positive_int("n", n)
    if sum(canary_repeats) > n:
        raise ValueError(f"the canaries need {sum(canary_repeats)} records, more than n={n}")
    rng = random.Random(seed)
    canaries = []
    for repeats in canary_repeats:
        name = f"{rng.choice(_PRIVATE_FIRST)} {rng.choice(_PRIVATE_LAST)}"
        canaries.append(Canary(name=name, code=f"{rng.randrange(10**6):06d}", repeats=int(repeats)))
    records = [c.text for c in canaries for _ in range(c.repeats)]
    records += [_private_record(rng) for _ in range(n - len(records))]
    rng.shuffle(records)
    return PrivateCorpus(records=records, canaries=canaries)


def synthetic_public_corpus(n: int, *, seed: int = 0) -> List[str]:
    """``n`` everyday sentences from templates and names disjoint from the private records."""
    check_positive_int("n", n)
    rng = random.Random(seed)
    return [
        rng.choice(_PUBLIC_TEMPLATES).format(
            adj=rng.choice(_ADJ), who=rng.choice(_PUBLIC_NAMES), place=rng.choice(_PLACES),
            thing=rng.choice(_THINGS), day=rng.choice(_DAYS),
        ).capitalize()
        for _ in range(n)
    ]


AUDIT_CANARY_TEMPLATE = "Audit canary {x}{x}{x}{x}{x}{x}{x}{x}{x}{x} on file."  # 16^10 ~ 1.1e12 fillings
MAX_AUDIT_CANARIES = 100_000
_AUDIT_STREAM = 0xA0D17  # tags the audit's RNG streams apart from every other use of the run's seed


@dataclass(frozen=True)
class AuditCanaries:
    """The one-run audit's canaries and which of them go into training: the AUDITOR'S SECRET (never train on
    ``included`` as a label, never publish it)."""

    texts: List[str]
    included: List[bool]
    seed: int

    @property
    def included_texts(self) -> List[str]:
        return [t for t, keep in zip(self.texts, self.included) if keep]


def _audit_stream(seed: int, purpose: int) -> List[int]:
    """numpy SeedSequence entropy for one purpose (0 texts, 1 coin flips, 2 positions); any int seed."""
    return [int(seed) % 2**64, _AUDIT_STREAM, purpose]


def audit_canaries(num: int, *, seed: int) -> AuditCanaries:
    """``num`` distinct random canaries of :data:`AUDIT_CANARY_TEMPLATE` and independent fair coins saying which
    are trained on; the texts and the coins use separate streams of ``seed``."""
    from dptrain.attacks.audit import sample_inclusion_mask
    from dptrain.attacks.canaries import CanaryTemplate

    check_int("audit-canaries", num, minimum=1, maximum=MAX_AUDIT_CANARIES)
    template = CanaryTemplate(AUDIT_CANARY_TEMPLATE)
    indices = template.sample_indices(num, seed=_audit_stream(seed, 0))  # (num,) distinct
    mask = sample_inclusion_mask(num, seed=_audit_stream(seed, 1))  # (num,) bool, P[True] = 1/2 each
    return AuditCanaries(texts=template.candidates(indices), included=[bool(b) for b in mask], seed=int(seed))


def with_audit_canaries(texts: Sequence[str], canaries: AuditCanaries) -> List[str]:
    """``texts`` plus each included canary once, at seeded random positions (the whole list is permuted)."""
    from dptrain.attacks.canaries import insert_canaries

    return insert_canaries(texts, canaries.included_texts, 1, seed=_audit_stream(canaries.seed, 2))


DATA_FORMATS = (".jsonl/.ndjson/.json (one JSON object per line), .csv/.tsv (a header row), .txt (one record per "
                "line), or a folder of .txt files (one record per file)")


def load_texts(path, text_column: str = "text") -> List[str]:
    """Records from ``path``: JSON Lines (the ``text_column`` field of each object), CSV/TSV (the ``text_column``
    column; header row first), a text file (one record per line) or a folder (each ``*.txt`` file one record).

    Blank records are skipped. ``FileNotFoundError`` for a missing path; ``ValueError`` naming the file and line
    for a bad record, an unknown format (naming the supported ones), or no record at all.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"data folder {path} has no .txt files (expected one record per .txt file)")
        texts = [_read_text(f) for f in files]
    elif not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    else:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            texts = _json_lines(path, text_column)
        elif suffix in (".csv", ".tsv"):
            texts = _csv_column(path, text_column, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".txt", ".text"):
            texts = _read_text(path).splitlines()
        else:
            raise ValueError(f"unsupported data file {path.name!r}: expected {DATA_FORMATS}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"data file {path} has no records (empty, or only blank lines)")
    return texts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                         f"expected {DATA_FORMATS}") from None


def _json_lines(path: Path, field: str) -> List[str]:
    texts = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({err.msg}); expected one JSON object per "
                             "line (JSON Lines)") from None
        if not isinstance(obj, dict) or field not in obj:
            found = f"fields: {', '.join(list(obj)[:8])}" if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: line {lineno} has no {field!r} field ({found}); pass --text-column")
        if not isinstance(obj[field], str):
            raise ValueError(f"{path}: line {lineno}: {field!r} must be a string, found {type(obj[field]).__name__}")
        texts.append(obj[field])
    return texts


def _csv_column(path: Path, column: str, delimiter: str) -> List[str]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    if reader.fieldnames is None or column not in reader.fieldnames:
        found = ", ".join(reader.fieldnames or []) or "none"
        raise ValueError(f"{path} has no column {column!r} in its header row (columns: {found}); pass --text-column")
    return [row[column] or "" for row in reader]
