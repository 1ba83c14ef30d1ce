"""The benchmarks' tables in markdown, the same in every domain: every row, the frontier per budget point,
AutoDecay against the envelope, the paired comparison with its checks, and why each peer has its settings.
A domain adds its own columns (`columns`: a header and a cell per row) and sections (`backends/`)."""
from .report import Scale


def number(value, digits: int = 2, sign: bool = True) -> str:
    """A table cell: `value` with `digits` decimals (a sign when `sign`), or "-" for None."""
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def spread(mean: float, sd: float, digits: int, runs: int = 2) -> str:
    """"mean ± sd", or the mean alone where there is no spread to show."""
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if runs > 1 and sd else "")


def results_table(rows: list[dict], scale: Scale, columns: tuple = ()) -> str:
    """The rows (regret, waste and envelope deficit: see `report.envelope_scores`), and a domain's `columns`."""
    digits, length = scale.digits, scale.length
    header = (f"| schedule | runs | {scale.title} | {length} used | saved vs the budget | regret | waste "
              "| envelope deficit |" + "".join(f" {title} |" for title, _ in columns))
    lines = [header, "|---" * (8 + len(columns)) + "|"]
    for row in rows:
        cells = [row["label"], str(row["runs"]),
                 spread(row[f"{scale.name}_mean"], row[f"{scale.name}_sd"], digits, row["runs"]),
                 spread(row[f"{length}_mean"], row[f"{length}_sd"], scale.length_digits),
                 f"{row[f'saved_{length}']:.{scale.length_digits}f} ({row['saved_percent']:.0f}%)",
                 number(row.get("regret"), digits), number(row.get("waste"), 2, sign=False),
                 number(row.get("envelope_deficit"), digits)] + [cell(row) for _, cell in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_table(rows: list[dict], frontier: list[str], scale: Scale) -> str:
    """The frontier's seed means: a line per family (a frontier or evaluated peer), a column per share of the
    budget run, headed by the length of the fixed-length points there."""
    families = list(dict.fromkeys(row["frontier"] for row in rows if row["frontier"]))
    if not families:
        return ""
    cells = {(row["frontier"], round(100 * row["budget_fraction"])): row for row in rows if row["frontier"]}
    percents = sorted({percent for _, percent in cells})
    lengths = {}
    for (family, percent), row in cells.items():  # the fixed-length points' lengths first
        if family in frontier or percent not in lengths:
            lengths[percent] = row[f"{scale.length}_mean"]
    lines = ["| frontier | " + " | ".join(f"{p}% ({lengths[p]:.3g} {scale.length})" for p in percents) + " |",
             "|---" * (1 + len(percents)) + "|"]
    for family in families:
        values = [cells.get((family, p)) for p in percents]
        lines.append(f"| {family} | " + " | ".join(
            f"{row[f'{scale.name}_mean']:.{scale.digits}f} ± {row[f'{scale.name}_sd']:.{scale.digits}f}" if row else ""
            for row in values) + " |")
    return "\n".join(lines)


def envelope_table(rows: list[dict], names: list[str], envelope: dict, scale: Scale) -> str:
    """The envelope numbers of the rows `names` (AutoDecay's), a line each, with what they are measured from."""
    chosen = [row for row in rows if row["label"] in names and row.get("regret") is not None]
    if not envelope or not chosen:
        return ""
    mean, length, digits = f"{scale.name}_mean", f"{scale.length}_mean", scale.digits
    lines = [f"| schedule | {scale.title} | {scale.length} used | regret | waste | envelope deficit |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['label']} | {row[mean]:.{digits}f} | {row[length]:.{scale.length_digits}f} | "
              f"{number(row['regret'], digits)} | {number(row['waste'], sign=False)} | "
              f"{number(row['envelope_deficit'], digits)} |" for row in chosen]
    best, shortest = envelope["best"], envelope["shortest_good"]
    lines += ["", f"best fixed-length point: {best['label']} ({best[mean]:.{digits}f} in {best[length]:g} "
              f"{scale.length}); the shortest within {envelope['tolerance']:g} of it: {shortest['label']} "
              f"({shortest[mean]:.{digits}f} in {shortest[length]:g} {scale.length})."]
    return "\n".join(lines)


def paired_table(name: str, summary: dict, checks: dict, scale: Scale) -> str:
    """The paired comparison as a markdown table (a line per seed), a line of means and one of checks."""
    if not summary.get("per_seed"):
        return ""
    digits, length = scale.digits, scale.length
    rivals = list(summary["per_seed"][0]["rivals"])
    lines = [f"| seed | {name} {length} | {name} {scale.title} | " + " | ".join(f"{r} at its length" for r in rivals)
             + " | better | deficit |", "|---" * (5 + len(rivals)) + "|"]
    for line in summary["per_seed"]:
        cells = " | ".join(number(line["rivals"].get(r), digits, sign=False) for r in rivals)
        lines.append(f"| {line['seed']} | {line[length]:.{scale.length_digits}f} | {line[scale.name]:.{digits}f} | "
                     f"{cells} | {line['best']} | {line['deficit']:+.{digits}f} |")
    lines += ["", f"{name} against the better of {' and '.join(rivals)} trained to its own length, paired by seed "
              f"({summary['seeds']} seeds): mean deficit {summary['mean_deficit']:+.{digits}f} ± "
              f"{summary['sd_deficit']:.{digits}f}; {name} {summary[f'{scale.name}_mean']:.{digits}f} ± "
              f"{summary[f'{scale.name}_sd']:.{digits}f} in {summary[f'{length}_mean']:.1f} ± "
              f"{summary[f'{length}_sd']:.1f} {length}, saving {summary['saved_percent']:.0f}% of the budget."]
    if checks:
        lines.append("checks: " + ", ".join(check_text(key, check, digits) for key, check in checks.items()))
    return "\n".join(lines)


def check_text(key: str, check: dict, digits: int) -> str:
    verdict = "passed" if check["passed"] else "FAILED"
    if key == "step":
        return (f"against StepDecay at the whole budget {check['value']:.{digits}f} vs {check['bound']:.{digits}f} "
                f"{verdict}")
    return f"{key} {check['value']:.{digits}f} {check['sense']} {check['bound']:g} {verdict}"


def notes_table(notes: dict) -> str:
    return "\n".join(["| schedule | why these settings |", "|---|---|"]
                     + [f"| {name} | {note} |" for name, note in notes.items()])
