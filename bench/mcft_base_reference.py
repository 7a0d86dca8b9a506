"""Issue 30, toy part: add the base reference row to the record the frozen driver wrote.

The toy runs were trained, evaluated and reported by a frozen copy of the driver (commit 27b7a77),
whose report has no row for the base itself. This evaluates the exported base that every arm
started from (``runs/mcft-experiment/base-model``) on the same validation and test rows with the
driver's own evaluator (:func:`metareason.plugins.mcft.experiment.base_reference`), recomputes the
statistics with the arms' per-seed outcomes from the record (now with every arm's McNemar against
the base) and renders the report again with the driver's own renderer. Nothing is retrained.

    METAREASON_PLUGINS=mcft OMP_NUM_THREADS=1 python bench/mcft_base_reference.py \
        --record bench/results/mcft-experiment.json --config configs/mcft/experiment.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from metareason.api import Kernel, write_record
from metareason.plugins.mcft import experiment as ex


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", default="bench/results/mcft-experiment.json")
    p.add_argument("--config", default="configs/mcft/experiment.yaml")
    args = p.parse_args()
    record = json.loads(Path(args.record).read_text())
    raw = yaml.safe_load(Path(args.config).read_text())
    exp = dict(ex.DEFAULTS, **raw.pop("experiment", {}))
    raw["quiet"] = True
    root = Kernel(dict(raw)).config.run_dir
    ref = ex.base_reference(raw, exp, record["base"], root / "data", root, reuse=True)
    arms = record["arms"]
    ex.statistics(arms, record["seeds"], record.get("best_threshold_arm"), ref)
    record["base_reference"] = {k: ref[k] for k in ("val", "test")}
    record["base_reference_command"] = " ".join(["python", *sys.argv])
    write_record(Path(args.record), record, ex.render(record))
    print(f"base: val {ref['val']['accuracy']:.3f}, test {ref['test']['accuracy']:.3f}; wrote {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
