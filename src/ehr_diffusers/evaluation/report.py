"""The evaluation report: ``metrics.json`` (every figure with its split and confidence interval) and one
self-contained HTML page (plots embedded as PNG data, no external files or scripts), plus the model card's metrics
block.

The report only renders what :mod:`ehr_diffusers.evaluation.ehr.suite` computed: ``metrics`` is the JSON document and
``plots`` holds the arrays behind the figures (prevalences, ages, distances), which are too large for the JSON.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_file
from .stats import roc_curve

METRICS_NAME = "metrics.json"
REPORT_NAME = "report.html"
SECTIONS = ("summary", "fidelity", "utility", "privacy", "prompt-faithfulness", "autoencoder", "plausibility",
            "definitions")

STYLE = (
    "\n"
    "body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; "
    "color: #222; line-height: 1.45; }\n"
    "h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }\n"
    "table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }\n"
    "th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }\n"
    "th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }\n"
    ".note { color: #555; font-size: .92em; } "
    ".warn { background: #fff4e0; padding: .5em 1em; border-left: 4px solid #e8a000; }\n"
    "figure { display: inline-block; margin: .5em 1em .5em 0; } "
    "figcaption { font-size: .85em; color: #555; max-width: 480px; }\n"
    "nav a { margin-right: 1em; }\n"
)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.json")


def _finite(value: Any) -> Any:
    """NaN or infinity would be invalid JSON; the suite states reasons instead, so meeting one here is a bug."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("metrics hold a non-finite number; a figure that cannot be computed must be None with a "
                         "reason")
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """``metrics`` as indented JSON, written atomically."""
    text = json.dumps(_finite(json.loads(json.dumps(metrics, default=_json_default))), indent=2, sort_keys=False)
    with atomic_file(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------------------------------- formatting
def format_figure(figure: Mapping[str, Any] | None, digits: int = 3) -> str:
    """"0.966 [0.951, 0.978]" for a figure with a CI, "n/a (reason)" for one that could not be computed."""
    if not figure or figure.get("value") is None:
        reason = (figure or {}).get("reason", "not computed")
        return f"n/a ({reason})"
    text = format_number(figure["value"], digits)
    if figure.get("ci95") is not None:
        low, high = figure["ci95"]
        text += f" [{format_number(low, digits)}, {format_number(high, digits)}]"
    return text


def format_number(value: float, digits: int) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 10 ** 5 or magnitude < 10 ** -digits):
        return f"{value:.{digits}g}"
    return f"{value:,.{digits}f}"


def escape(text: Any) -> str:
    return html.escape(str(text))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = []
    for row in rows:
        cells = [f"<td{' class=num' if i >= numeric_from else ''}>{escape(cell)}</td>" for i, cell in enumerate(row)]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


# ------------------------------------------------------------------------------------------------------- plotting
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_figure(fig: Any, caption: str) -> str:
    return (f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def new_axes(width: float = 4.6, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_prevalence(real: np.ndarray, synthetic: np.ndarray, split: str) -> str:
    fig, ax = new_axes()
    top = max(float(real.max(initial=0)), float(synthetic.max(initial=0)), 1e-3)
    ax.plot([0, top], [0, top], color="#999", lw=1)
    ax.scatter(real, synthetic, s=6, alpha=0.6)
    ax.set_xlabel(f"real prevalence ({split})")
    ax.set_ylabel("synthetic prevalence")
    return html_figure(fig, f"Per-code prevalence, real {split} vs synthetic; the diagonal is perfect agreement.")


def plot_correlation_difference(difference: np.ndarray, codes: Sequence[str], split: str) -> str:
    fig, ax = new_axes(5.4, 4.6)
    image = ax.imshow(difference, cmap="RdBu_r", vmin=-1, vmax=1)
    if len(codes) <= 40:
        ax.set_xticks(range(len(codes)), codes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(codes)), codes, fontsize=6)
    fig.colorbar(image, ax=ax, shrink=0.8, label="r(real) - r(synthetic)")
    return html_figure(fig, f"Difference of the Pearson correlation matrices (real {split} minus synthetic) over the "
                        f"{len(codes)} most prevalent codes.")


def plot_histograms(real: np.ndarray, synthetic: np.ndarray, label: str, split: str, integer: bool) -> str:
    """Both distributions as shares; values beyond the pooled 99.5th percentile go into the last bin (a few
    extreme records would otherwise squeeze the rest into one bar), and the caption says how many."""
    pooled = np.concatenate([real, synthetic]).astype(np.float64)
    low, high = float(pooled.min(initial=0)), float(np.percentile(pooled, 99.5)) if len(pooled) else 1.0
    high = max(high, low + 1)
    if integer and high - low <= 120:
        bins: Any = np.arange(math.floor(low), math.ceil(high) + 2) - 0.5
    else:
        bins = np.linspace(low, high, 31)
    clipped = int((real > high).sum() + (synthetic > high).sum())
    fig, ax = new_axes()
    ax.hist(np.minimum(real, high), bins=bins, density=True, alpha=0.55, label=f"real {split}")
    ax.hist(np.minimum(synthetic, high), bins=bins, density=True, alpha=0.55, label="synthetic")
    ax.set_xlabel(label)
    ax.set_ylabel("share of records")
    ax.legend()
    note = f" {clipped:,} records above {high:g} are counted in the last bin." if clipped else ""
    return html_figure(fig, f"{label}: real {split} and synthetic records.{note}")


def plot_roc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> str:
    """ROC of the membership attack whose score is minus the distance to the nearest synthetic record."""
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    fig, ax = new_axes(4.0, 3.6)
    ax.plot([0, 1], [0, 1], color="#999", lw=1)
    ax.plot(fpr, tpr)
    ax.set_xlabel("false-positive rate (holdout called member)")
    ax.set_ylabel("true-positive rate (train called member)")
    return html_figure(fig, "Membership inference ROC (score: minus the distance to the nearest synthetic record); the "
                        "diagonal is chance.")


def plot_attribute_accuracy(attributes: Mapping[str, Mapping[str, Any]]) -> str:
    names = [name for name, figure in attributes.items() if figure.get("value") is not None]
    values = np.array([attributes[name]["value"] for name in names])
    lows = np.array([attributes[name]["ci95"][0] for name in names])
    highs = np.array([attributes[name]["ci95"][1] for name in names])
    fig, ax = new_axes(5.0, 3.4)
    ax.bar(range(len(names)), values, yerr=[values - lows, highs - values], capsize=3, color="#4c78a8")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    return html_figure(fig, "Prompt faithfulness per stated attribute.")


# -------------------------------------------------------------------------------------------------------- sections
def _comparison_table(comparison: Mapping[str, Any]) -> str:
    methods = comparison["methods"]
    rows = [[row["label"], row["split"], row["better"], *(format_figure(row["values"].get(m)) for m in methods)]
            for row in comparison["rows"]]
    return html_table(["figure", "split", "better", *(comparison["labels"][m] for m in methods)], rows, numeric_from=3)


def html_section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _figures_table(figures: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    rows = [[labels.get(key, key), figure.get("split", ""), format_figure(figure)] for key, figure in figures.items()]
    return html_table(["figure", "split", "value [95% CI]"], rows, numeric_from=2)


def _reconstruction(block: Mapping[str, Any]) -> str:
    """The autoencoder's reconstruction of real holdout records beside independent marginals, flagged when behind:
    generated records cannot beat the marginals where the decoder itself does not."""
    mine, reference = block.get("reconstruction", {}), block.get("independent_marginals", {})
    rows = [[key, format_number(mine[key], 3), format_number(reference[key], 3) if key in reference else "n/a"]
            for key in mine if isinstance(mine[key], (int, float))]
    behind = block.get("behind_marginals") or []
    flag = (f'<p class="warn">The reconstruction is behind independent marginals on {escape(", ".join(behind))}: '
            "generated records will be too.</p>" if behind else
            "<p class=note>The reconstruction is ahead of independent marginals on every headline figure.</p>")
    note = (f"<p class=note>Holdout records encoded and decoded by the trained autoencoder "
            f"({escape(block.get('decode_mode', 'sample'))} decoding, seed {escape(block.get('seed', ''))}), scored "
            "against the holdout with the same definitions as above (from the training's "
            "autoencoder_metrics.json).</p>")
    return flag + note + html_table(["figure", "reconstruction", "independent marginals"], rows)


def render_html(metrics: Mapping[str, Any], plots: Mapping[str, Any]) -> str:
    """The report page for one evaluation run (``metrics`` and ``plots`` as the suite returns them)."""
    run = metrics["run"]
    split = "holdout"
    parts = [f"<h1>Evaluation of synthetic EHR: {escape(run['model'])}</h1>",
             "<nav>" + "".join(f'<a href="#{name}">{name}</a>' for name in SECTIONS) + "</nav>"]
    if run.get("synthetic_data"):
        parts.append('<p class="warn">The real data are the synthetic demo cohort: these numbers describe the '
                     "toolkit, not MIMIC-IV.</p>")
    facts = [["model", run["model"]], ["dataset", run["dataset"]], ["seed", run["seed"]],
             ["real train rows (membership inference members)", f"{run['train_rows']:,} ({run['train_rows_used']:,})"],
             ["real holdout rows, every one scored (membership inference non-members, holdout_eval)",
              f"{run['holdout_rows']:,} ({run['holdout_eval_rows']:,})"],
             ["synthetic records", f"{run['synthetic_rows']:,}"],
             ["generation", json.dumps(run["generation"])], ["ehr-diffusers", run["ehr_diffusers_version"]]]
    summary = html_table(["", ""], facts, numeric_from=9)
    summary += ("<p class=note>Fidelity and privacy are measured on unconditional samples (the learned null "
                "condition): prompts made from real patients would carry those patients into the synthetic set. "
                "Every set is scored against the whole real holdout, beside independent marginals and real train "
                "rows of the same size. Prompt faithfulness is measured separately on prompts made from train "
                "patients, never from the holdout.</p>")
    summary += _comparison_table(metrics["comparison"])
    parts.append(html_section("summary", "Summary: the model against baselines", summary))

    fidelity = metrics["fidelity"]
    body = _figures_table(fidelity["figures"], fidelity["labels"])
    body += plot_prevalence(plots["real_prevalence"], plots["synthetic_prevalence"], split)
    body += plot_correlation_difference(plots["correlation_difference"], plots["correlation_codes"], split)
    body += plot_histograms(plots["real_age"], plots["synthetic_age"], "age (years)", split, integer=True)
    body += plot_histograms(plots["real_codes_per_patient"], plots["synthetic_codes_per_patient"],
                            "ICD-10 categories per patient", split, integer=True)
    body += "<h3>Demographics</h3>" + html_table(["field", "distance", "real", "synthetic"], fidelity["demographics"])
    never = fidelity["never_generated"]
    body += (f"<p>{never['count']:,} of {never['of_present']:,} codes present in the real {split} were never "
             f"generated; first ones: {escape(', '.join(never['codes'][:30])) or 'none'}.</p>")
    parts.append(html_section("fidelity", "Fidelity", body))

    utility = metrics["utility"]
    body = _figures_table(utility["figures"], utility["labels"]) + f"<p class=note>{escape(utility['note'])}</p>"
    body += html_table(["code", "prevalence (train)", "AUROC TRTR", "AUROC TSTR", "F1 TRTR", "F1 TSTR"],
                   utility["per_code"])
    parts.append(html_section("utility", "Utility: dimension-wise prediction", body))

    privacy = metrics["privacy"]
    body = _figures_table(privacy["figures"], privacy["labels"]) + f"<p class=note>{escape(privacy['note'])}</p>"
    if len(plots["member_distances"]) and len(plots["nonmember_distances"]):
        body += plot_roc(-plots["member_distances"], -plots["nonmember_distances"])
    else:
        body += f"<p>No ROC: {escape(privacy['figures']['mia_auc'].get('reason', 'membership inference skipped'))}.</p>"
    parts.append(html_section("privacy", "Privacy", body))

    prompts = metrics["prompt_faithfulness"]
    if prompts.get("attributes"):
        body = _figures_table(prompts["figures"], prompts["labels"])
        body += plot_attribute_accuracy(prompts["attributes"])
        body += f"<p class=note>{escape(prompts['note'])}</p>"
    else:
        body = f"<p>Not measured: {escape(prompts.get('reason', 'no prompts'))}.</p>"
    parts.append(html_section("prompt-faithfulness", "Prompt faithfulness", body))

    reconstruction = metrics.get("autoencoder_reconstruction")
    body = (_reconstruction(reconstruction) if reconstruction else
            "<p>Not available: the model folder has no autoencoder_metrics.json with holdout figures (train-ehr "
            "writes it beside the pipeline).</p>")
    parts.append(html_section("autoencoder", "Autoencoder: reconstruction of holdout records", body))

    plausibility = metrics["plausibility"]
    body = html_table(["rule", "source", "real holdout", "synthetic"], plausibility["rows"], numeric_from=2)
    parts.append(html_section("plausibility", "Clinical plausibility (violation rates)", body))

    definitions = "".join(f"<li><b>{escape(name)}</b>: {escape(text)}</li>"
                          for name, text in metrics["definitions"].items())
    parts.append(html_section("definitions", "Definitions", f"<ul>{definitions}</ul>"))
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>ehr-diffusers evaluation</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_page(metrics: Mapping[str, Any], page: str, out_dir: str | Path) -> tuple[Path, Path]:
    """``metrics.json`` and the rendered ``page`` as ``report.html`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = write_metrics(metrics, out_dir / METRICS_NAME)
    with atomic_file(out_dir / REPORT_NAME) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return metrics_path, out_dir / REPORT_NAME


def write_report(metrics: Mapping[str, Any], plots: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """The EHR evaluation's ``metrics.json`` and ``report.html`` in ``out_dir``."""
    return write_page(metrics, render_html(metrics, plots), out_dir)


def model_card_markdown(metrics: Mapping[str, Any]) -> str:
    """The comparison table as markdown for the model card's metrics block."""
    comparison, run = metrics["comparison"], metrics["run"]
    methods = comparison["methods"]
    cohort = " of the synthetic demo cohort" if run.get("synthetic_data") else ""
    decoding = run.get("generation", {}).get("decode_mode", "threshold")
    lines = [f"Evaluated with `ehr-diffusers evaluate` (ehr-diffusers {run['ehr_diffusers_version']}) on "
             f"{run['synthetic_rows']:,} synthetic records ({decoding} decoding) against the real holdout split "
             f"({run['holdout_rows']:,} patients{cohort}; membership inference: {run['holdout_eval_rows']:,} of them "
             f"as non-members), seed {run['seed']}. Values are the figure and its 95% CI.", "",
             "| figure | split | better | " + " | ".join(comparison["labels"][m] for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for row in comparison["rows"]:
        cells = " | ".join(format_figure(row["values"].get(m)) for m in methods)
        lines.append(f"| {row['label']} | {row['split']} | {row['better']} | {cells} |")
    return "\n".join(lines)
