"""Paper reproductions. Each experiment trains, measures and writes `report.md` + `results.json` (+ PNGs).

`run_experiment(name, setting, out_dir)` is the one entry point (the CLI's `multitoken experiment NAME`).
Settings: `cpu` (the decisive setting, about 20 minutes on 2 CPU cores; `quick` is its alias, what the CLI
passes by default), `full` (a GPU or a long CPU run), `test` (seconds, for tests).
Modules are imported on demand, so listing the experiments costs nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

EXPERIMENTS = {
    "induction": "Induction: copying a repeated string or two-token names (paper §4.1)",
    "polynomials": "Polynomial arithmetic in F7[X]/(X^5) (paper §4.2)",
    "selfspec": "Byte-level self-speculative decoding (paper Table S3 layout)",
    "heads_used": "Heads used vs speedup, token-level n=4, code and text (paper Table S2 layout)",
    "head_variants": "Head variants: parallel, causal, anticausal, linear (paper Table S4 layout)",
}


def run_experiment(
    name: str,
    setting: str = "cpu",
    out_dir: str | Path | None = None,
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run experiment `name` at `setting`; write the report into `out_dir` (default docs/results/NAME).

    `seeds` and `overrides` (fields of the experiment's `Setting`, e.g. {"steps": 100}) change the setting;
    `command` is the command line recorded in the report (default: the line that reproduces the run).
    Returns the results.json document.
    """
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    from multitoken.experiments.common import canonical_setting

    setting = canonical_setting(setting)
    module = importlib.import_module(f"multitoken.experiments.{name}")
    overrides = {**(overrides or {}), **({"seeds": list(seeds)} if seeds else {})}
    return module.run(setting, Path(out_dir) if out_dir else None, command, overrides or None)
