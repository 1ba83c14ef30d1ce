"""What the study recipes share: whole runs in a pool of worker processes, and the study's outputs."""
import dataclasses
import json
import multiprocessing
from pathlib import Path


def run_in_pool(function, jobs: list, processes: int):
    """Yield `function(job)` for every job as it finishes: in a pool of worker processes ("spawn":
    each starts its own torch and Accelerate state), or in this process when `processes` is 1."""
    if processes == 1:
        yield from map(function, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(function, jobs)
        pool.close()  # let the workers exit cleanly rather than be terminated
        pool.join()


def write_study(output_dir: str, name: str, runs: list[dict], table: str, cfg) -> Path:
    """A study's results: `summary.json` (runs, table, the config) and `NAME.md` (the table)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = {"runs": runs, "table": table, "config": dataclasses.asdict(cfg)}
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output / f"{name}.md").write_text(table + "\n")
    return output
