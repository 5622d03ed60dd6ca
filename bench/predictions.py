"""The figures predicted for the next GPU run, held against what a run of bench/gpu_check.py measured.

    python bench/predictions.py RECORD.json [--predictions bench/predictions.json] [--json OUT.json]
    python bench/predictions.py             # the predictions alone: range, unit and why, one per line

bench/gpu_check.py prints this comparison at the end of a run (and stores it in its JSON as "predictions"); the
command above prints it again for a recorded run, on any machine. Each prediction in predictions.json names one
figure of the record (or the ratio or difference of two) and a range written before the run; the comparison
says, per figure, whether the measurement fell inside, below or above it, or is missing from the record. A time or
rate measured on another GPU model than the file's "device" (an H100 run of H200 predictions) reads "other device";
ratios are held against their ranges on any GPU.

A figure ("what" in the JSON) is
    {"in": "rows", "where": {"op": ..., "shape": ..., "provider": ...}, "key": "seconds", "scale": 1000}
where "in" is a top-level field of the record (a list of rows: the one row whose fields equal "where", or
with "sum": true the sum over all such rows; a dict: its field "key"), "/" steps into a dict ("profiles/<case>"),
"match" holds regular expressions a row's fields must match (re.search), "count": true takes the length of a
list field, and "scale" multiplies the value; or {"ratio": [figure, figure]} or {"difference": [figure, figure]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "predictions.json")
VERDICTS = ("inside", "below", "above", "missing", "other device")
# Units of the figures that hold for the predictions' device alone: times and rates. A run on another kind of GPU
# (the lent machines are H100s and H200s) reads them as "other device", not above or below; ratios measured side by
# side in one run ("x", "x default", "of copy") and test counts are held against their ranges on any device.
ABSOLUTE_UNITS = frozenset({"ms", "us", "s", "GB/s"})


def load(path: str = DEFAULT) -> dict:
    """The predictions file, its entries checked for the fields compare() needs (a ValueError naming the entry)."""
    with open(path) as f:
        data = json.load(f)
    for i, p in enumerate(data.get("predictions", [])):
        name = p.get("id", f"entry {i}")
        missing = [k for k in ("id", "what", "low", "high", "unit", "why") if k not in p]
        if missing:
            raise ValueError(f"{path}: prediction {name!r} lacks {', '.join(missing)}")
        if not p["low"] <= p["high"]:
            raise ValueError(f"{path}: prediction {name!r} has low {p['low']} above high {p['high']}")
        check_figure(p["what"], name)
    ids = [p["id"] for p in data.get("predictions", [])]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: prediction ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return data


def check_figure(what: dict, name: str) -> None:
    """A figure's form (not whether the record holds it): a ValueError naming the prediction."""
    if not isinstance(what, dict):
        raise ValueError(f"prediction {name!r}: a figure is a dict, got {what!r}")
    for combine in ("ratio", "difference"):
        if combine in what:
            parts = what[combine]
            if not (isinstance(parts, list) and len(parts) == 2):
                raise ValueError(f"prediction {name!r}: {combine} takes two figures")
            for part in parts:
                check_figure(part, name)
            return
    unknown = set(what) - {"in", "where", "match", "key", "scale", "sum", "count"}
    if "in" not in what or unknown:
        raise ValueError(f"prediction {name!r}: a figure needs 'in' and takes where/match/key/scale/sum/count"
                         f"{'; unknown ' + ', '.join(sorted(unknown)) if unknown else ''}")


def value_of(record: dict, what: dict) -> float | None:
    """The figure `what` in a gpu_check record, or None where the record does not hold it (a row not run, an
    error row, a field absent) or holds it more than once without "sum"."""
    for combine, op in (("ratio", lambda a, b: a / b if b else None), ("difference", lambda a, b: a - b)):
        if combine in what:
            a, b = (value_of(record, part) for part in what[combine])
            return None if a is None or b is None else op(a, b)
    node = record
    for part in what["in"].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    if isinstance(node, list) and "key" in what and not what.get("count"):
        rows = [r for r in node if isinstance(r, dict) and "error" not in r
                and all(r.get(k) == v for k, v in what.get("where", {}).items())
                and all(re.search(rx, str(r.get(k, ""))) for k, rx in what.get("match", {}).items())]
        values = [r.get(what["key"]) for r in rows]
        if not values or any(not isinstance(v, (int, float)) for v in values):
            return None
        if len(values) > 1 and not what.get("sum"):
            return None
        value = float(sum(values))
    else:
        if "key" in what:
            node = node.get(what["key"]) if isinstance(node, dict) else None
        if what.get("count"):
            value = float(len(node)) if isinstance(node, (list, tuple, dict)) else None
        else:
            value = float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None
    if value is None or math.isnan(value):
        return None
    return value * what.get("scale", 1.0)


def device_model(name) -> str:
    """A GPU's model from its name, lower case ("NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200",
    "NVIDIA A100-SXM4-80GB" -> "a100"); the whole name, lower case, where no such word is in it; "" for none."""
    found = re.search(r"\b([A-Za-z]{1,2}\d{2,4}[A-Za-z]?)\b", str(name or ""))
    return (found.group(1) if found else str(name or "")).strip().lower()


def other_device(record: dict, predictions: dict) -> bool:
    """The run's GPU is another model than the one the predictions were written for (both named)."""
    ran, meant = device_model(record.get("device")), device_model(predictions.get("device"))
    return bool(ran and meant) and ran != meant


def compare(record: dict, predictions: dict) -> list[dict]:
    """Per prediction: id, unit, low, high, measured (None where missing) and the verdict ("other device" for a
    time or rate measured on another GPU model than the predictions': ABSOLUTE_UNITS)."""
    out = []
    elsewhere = other_device(record, predictions)
    for p in predictions.get("predictions", []):
        value = value_of(record, p["what"])
        verdict = ("missing" if value is None else "other device" if elsewhere and p["unit"] in ABSOLUTE_UNITS
                   else "below" if value < p["low"] else "above" if value > p["high"] else "inside")
        out.append({"id": p["id"], "unit": p["unit"], "low": p["low"], "high": p["high"], "measured": value,
                    "verdict": verdict})
    return out


def _num(v: float) -> str:
    return f"{v:.4g}"


def format_comparison(results: list[dict], predictions: dict, brief: bool = False, device: str | None = None) -> str:
    """A short table: one line per prediction, then the count of each verdict ("other device" only where some
    are). brief: a line for each figure outside its range only, the missing ones named on one line (a run's log,
    whose tail is what comes back first). device: the run's GPU, named in the heading where the predictions were
    written for another."""
    width = max([len(r["id"]) for r in results] + [10])
    lines = [f"predictions ({predictions.get('written', '?')}, {predictions.get('basis', '')}) against this run"
             + (" (figures outside their range):" if brief else ":")]
    if any(r["verdict"] == "other device" for r in results):
        lines.append(f"  (written for {predictions.get('device', '?')}; this run on {device or 'another GPU'}: "
                     f"its times and rates ({', '.join(sorted(ABSOLUTE_UNITS))}) are not held against them)")
    for r in results:
        if brief and r["verdict"] in ("inside", "missing", "other device"):
            continue
        measured = "-" if r["measured"] is None else _num(r["measured"])
        lines.append(f"  {r['verdict']:7} {r['id']:{width}} {measured:>10} {r['unit']:9} "
                     f"predicted {_num(r['low'])} to {_num(r['high'])}")
    missing = [r["id"] for r in results if r["verdict"] == "missing"]
    if brief and missing:
        lines.append("  missing: " + "; ".join(missing))
    counts = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS}
    lines.append("  " + ", ".join(f"{n} {v}" for v, n in counts.items() if n or v != "other device"))
    return "\n".join(lines)


def format_predictions(predictions: dict) -> str:
    """The predictions without a run: id, range and unit, and the reasoning's place, one per line."""
    lines = [f"predictions written {predictions.get('written', '?')} for {predictions.get('device', '?')}, "
             f"{predictions.get('basis', '')}:"]
    for p in predictions.get("predictions", []):
        lines.append(f"  {p['id']}: {_num(p['low'])} to {_num(p['high'])} {p['unit']} ({p['why']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", nargs="?", help="a JSON file written by bench/gpu_check.py")
    parser.add_argument("--predictions", default=DEFAULT)
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    try:
        predictions = load(args.predictions)
        record = None
        if args.record is not None:
            with open(args.record) as f:
                record = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"predictions: {exc}", file=sys.stderr)
        return 2
    if record is None:
        print(format_predictions(predictions))
        return 0
    results = compare(record, predictions)
    print(f"record: {record.get('device', '?')}, commit {record.get('commit', '?')}, {record.get('date', '?')}")
    print(format_comparison(results, predictions, device=record.get("device")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
