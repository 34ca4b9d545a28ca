"""The X-ray evaluation report: ``metrics.json`` and one self-contained HTML page (images and plots embedded as PNG
data), plus the model card's metrics block. It renders what :mod:`.suite` computed; the image grids show the
triplets whose findings changed first, since those are where the events have to act."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..report import (
    STYLE,
    escape,
    format_figure,
    html_figure,
    html_section,
    html_table,
    new_axes,
    write_page,
)
from .suite import FIGURE_LABELS, METHOD_LABELS, METHODS

# Tables whose events are routine measurements; the grid lists the other events (drugs, fluids, procedures,
# cultures) first, as they are the ones that change findings.
ROUTINE_TABLES = ("chartevents", "labevents")
TABLE_FIGURES = ("auroc_micro_diff", "auroc_macro_diff", "direction_diff", "auroc_micro_same", "auroc_micro_all",
                 "fid", "kid", "ssim")
PLOT_METHODS = ("model", "shuffled_events", "no_events", "previous_image", "events_only", "target_image")


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def grid_strip(previous: np.ndarray, predicted: np.ndarray, target: np.ndarray, panel: int = 128) -> np.ndarray:
    """previous | predicted | target | |predicted - previous| (the difference stretched to its own maximum), each
    panel ``panel`` px, as one uint8 image."""
    difference = np.abs(predicted.astype(np.int16) - previous.astype(np.int16)).astype(np.float32)
    difference = (difference / max(float(difference.max()), 1.0) * 255).astype(np.uint8)
    panels = [np.asarray(PIL.Image.fromarray(np.asarray(image, np.uint8)).resize((panel, panel),
                                                                                PIL.Image.Resampling.NEAREST))
              for image in (previous, predicted, target, difference)]
    gap = np.full((panel, 4), 255, np.uint8)
    return np.concatenate([part for image in panels for part in (image, gap)][:-1], axis=1)


def select_grid_rows(previous: np.ndarray, target: np.ndarray, subjects: np.ndarray, diff_rows: int = 8,
                     same_rows: int = 4, seed: int = 0) -> list[int]:
    """Triplets for the grid: up to ``diff_rows`` whose findings changed, then ``same_rows`` whose did not, one per
    subject, in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(previous))
    changed = (np.asarray(previous, bool) != np.asarray(target, bool)).any(axis=1)
    chosen, seen = [], set()
    for wanted, count in ((True, diff_rows), (False, same_rows)):
        taken = 0
        for row in order:
            if taken == count:
                break
            if changed[row] == wanted and subjects[row] not in seen:
                chosen.append(int(row))
                seen.add(subjects[row])
                taken += 1
    return chosen


def grid_entries(rows: Sequence[int], split: Any, predicted: Any, previous: np.ndarray, target: np.ndarray,
                 findings: Sequence[str], event_texts: Sequence[Sequence[str]],
                 event_tables: Sequence[Sequence[str]], max_events: int = 12) -> list[dict[str, Any]]:
    """One grid entry per row of ``split`` in ``rows`` (``event_texts`` and ``event_tables`` in the order of
    ``rows``): the strip as PNG data, the label changes and the events other than routine measurements."""
    entries = []
    for position, row in enumerate(rows):
        changes = [f"{name}: {'absent' if before else 'present'} -> {'present' if after else 'absent'}"
                   for name, before, after in zip(findings, previous[row], target[row]) if before != after]
        texts, tables = list(event_texts[position]), list(event_tables[position])
        decisive = [text for text, table in zip(texts, tables) if table not in ROUTINE_TABLES]
        routine = len(texts) - len(decisive)
        strip = grid_strip(split.previous[row].numpy(), np.asarray(predicted[row]), split.target[row].numpy())
        entries.append({"triplet_id": int(split.triplet_id[row]),
                        "subject_id": int(split.subject_id[row]) if split.subject_id is not None else None,
                        "changes": changes, "events": decisive[-max_events:],
                        "more_events": max(0, len(decisive) - max_events), "routine_events": routine,
                        "png": _png(strip)})
    return entries


def plot_per_finding(per_finding: Mapping[str, Mapping[str, Sequence[float | None]]], findings: Sequence[str],
                     subset: str = "diff") -> str:
    """Grouped bars: AUROC per finding on ``subset`` for the model, its controls and the baselines."""
    fig, ax = new_axes(max(6.0, 0.9 * len(findings) + 2), 3.8)
    width = 0.8 / len(PLOT_METHODS)
    x = np.arange(len(findings))
    for index, method in enumerate(PLOT_METHODS):
        values = [np.nan if value is None else value for value in per_finding[method][subset]]
        ax.bar(x + (index - len(PLOT_METHODS) / 2 + 0.5) * width, values, width, label=METHOD_LABELS[method])
    ax.axhline(0.5, color="#888", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, findings, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"AUROC ({subset.capitalize()})")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return html_figure(fig, f"AUROC of the target's findings per finding on the {subset.capitalize()} subset "
                            "(pairs whose label changed); 0.5 is chance, missing bars have one class only.")


def _checked(value: Any) -> str:
    return "none shared with the split" if value else "not recorded, not checked"


def _methods_table(figures: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [[METHOD_LABELS[method], *(format_figure(figures[name].get(method)) if method in figures[name] else "-"
                                      for name in TABLE_FIGURES)] for method in METHODS]
    return html_table(["method", *(FIGURE_LABELS[name] for name in TABLE_FIGURES)], rows)


def _per_finding_table(metrics: Mapping[str, Any]) -> str:
    per_finding, findings = metrics["per_finding"], metrics["findings"]
    rows = []
    for index, name in enumerate(findings):
        cells = [name, metrics["pairs"]["diff"][index], metrics["onsets"][index], metrics["resolutions"][index]]
        for method in PLOT_METHODS:
            value = per_finding[method]["diff"][index]
            cells.append("n/a" if value is None else f"{value:.3f}")
        rows.append(cells)
    return html_table(["finding", "Diff pairs", "onsets", "resolutions",
                       *(f"AUROC Diff: {METHOD_LABELS[m]}" for m in PLOT_METHODS)], rows)


def _grid(entries: Sequence[Mapping[str, Any]]) -> str:
    parts = ["<p class=note>Each row: previous | predicted (true events) | target | |predicted - previous| "
             "(stretched to its maximum). Triplets whose findings changed come first.</p>"]
    for entry in entries:
        changes = "; ".join(entry["changes"]) or "no finding changed"
        events = "".join(f"<li>{escape(text)}</li>" for text in entry["events"]) or "<li>none</li>"
        more = f" ({entry['more_events']} earlier ones not shown)" if entry["more_events"] else ""
        parts.append(
            f'<div class=row><img alt="triplet {entry["triplet_id"]}" src="data:image/png;base64,{entry["png"]}">'
            f"<p><b>triplet {entry['triplet_id']}</b>, subject {entry['subject_id']}: {escape(changes)}</p>"
            f"<p class=note>events other than charted vitals and labs, most recent last{more}; "
            f"{entry['routine_events']} charted vitals and labs not listed:</p><ul>{events}</ul></div>")
    return "".join(parts)


def render_cxr_html(metrics: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> str:
    """The report page of one X-ray evaluation run."""
    run = metrics["run"]
    parts = [f"<h1>Evaluation of predicted chest X-rays: {escape(run['model'])}</h1>"]
    if run.get("synthetic_data"):
        parts.append('<p class="warn">The real data are the synthetic demo cohort: these numbers describe the '
                     "toolkit, not MIMIC-CXR.</p>")
    facts = [["model", run["model"]], ["dataset", run["dataset"]], ["split", run["split"]],
             ["triplets (subjects)", f"{metrics['triplets']:,} ({metrics['subjects']:,})"],
             ["finding scorer (every AUROC, FID and KID)", f"{run['scorer']}; {run.get('scorer_source', '')}"],
             ["leakage checks", f"model's training subjects: {_checked(run.get('training_subjects_checked'))}; "
                                f"scorer's: {_checked(run.get('scorer_training_subjects_checked'))}"],
             ["sampling", ", ".join(f"{key} {value}" for key, value in metrics["sampling"].items())],
             ["shuffled events", f"{metrics['shuffle']['kind']}, seed {metrics['shuffle']['seed']}"],
             ["ehr-diffusers", run["ehr_diffusers_version"]]]
    summary = html_table(["", ""], facts, numeric_from=9)
    summary += _methods_table(metrics["figures"])
    summary += ("<p class=note>Values are the figure and its 95% interval from a cluster bootstrap over the "
                "split's subjects (FID and KID: normal interval around the estimate). Diff: the pairs of (triplet, "
                "finding) whose label changed between the two studies; Same: the rest.</p>")
    parts.append(html_section("summary", "Summary: the model, its event controls and the baselines", summary))
    contrasts = [[name, format_figure(value)] for name, value in metrics["contrasts"].items()]
    body = html_table(["difference (paired over the same resamples)", "value [95% CI]"], contrasts)
    goals = [[goal["goal"], "met" if goal["met"] else "not met", goal["detail"]] for goal in metrics["goals"]]
    body += "<h3>Goals</h3>" + html_table(["goal", "", "figures"], goals, numeric_from=3)
    parts.append(html_section("event-effect", "Event effect: true events against shuffled and no events", body))
    body = plot_per_finding(metrics["per_finding"], metrics["findings"]) + _per_finding_table(metrics)
    parts.append(html_section("per-finding", "Per finding", body))
    parts.append(html_section("images", "Images", _grid(entries)))
    definitions = "".join(f"<li><b>{escape(name)}</b>: {escape(text)}</li>" for name, text in DEFINITIONS.items())
    parts.append(html_section("definitions", "Definitions", f"<ul>{definitions}</ul>"))
    style = STYLE + ".row { margin: 1em 0; } .row img { display: block; }\n"
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>ehr-diffusers X-ray evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


DEFINITIONS = {
    "FID": "Frechet distance between Gaussians fitted to the scorer's features of the predicted and the target "
           "images (Heusel et al. 2017).",
    "KID": "Unbiased squared MMD with the cubic polynomial kernel on the same features (Binkowski et al. 2018); "
           "unlike FID it has no bias that grows as the sample shrinks.",
    "AUROC": "Probability that the scorer rates a (triplet, finding) pair whose target label is present above one "
             "whose target label is absent; per finding, micro (all pairs pooled) and macro (mean over findings), on "
             "All, Diff and Same as in EHRXDiff (arXiv 2409.07012). A present finding is CheXpert 1 or -1.",
    "direction of change": "On Diff pairs, the share whose score moved from the previous image to the prediction "
                           "the way the label moved (up for an onset, down for a resolution); no move counts one "
                           "half, so the previous image scores 0.5.",
    "SSIM": "Structural similarity to the target (Wang et al. 2004), 11-tap Gaussian window, per image, averaged.",
    "shuffled events": "Each triplet gets another triplet's events (a seeded derangement), with the same previous "
                       "image and starting noise: what the model does when the events are not this patient's.",
    "events-only classifier": "Logistic regression per finding on the mean and maximum of the event embeddings, "
                              "fitted on the train split: what the events alone say about the target's findings.",
}


def write_cxr_report(metrics: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], out_dir: str | Path
                     ) -> tuple[Path, Path]:
    """``metrics.json`` and ``report.html`` in ``out_dir``, each written atomically."""
    return write_page(metrics, render_cxr_html(metrics, entries), out_dir)


def cxr_model_card_markdown(metrics: Mapping[str, Any]) -> str:
    """The methods table as markdown for the model card's metrics block."""
    run = metrics["run"]
    cohort = " of the synthetic demo cohort" if run.get("synthetic_data") else ""
    lines = [f"Evaluated with `ehr-diffusers evaluate-cxr` (ehr-diffusers {run['ehr_diffusers_version']}) on the "
             f"{run['split']} split ({metrics['triplets']:,} triplets of {metrics['subjects']:,} subjects{cohort}); "
             f"finding scorer: {run['scorer']}. Values are the figure and its 95% CI (cluster bootstrap over "
             "subjects). Training subjects of the model: "
             f"{_checked(run.get('training_subjects_checked'))}.", "",
             "| method | " + " | ".join(FIGURE_LABELS[name] for name in TABLE_FIGURES) + " |",
             "|---|" + "---|" * len(TABLE_FIGURES)]
    for method in METHODS:
        cells = " | ".join(format_figure(metrics["figures"][name].get(method)) if method in metrics["figures"][name]
                           else "-" for name in TABLE_FIGURES)
        lines.append(f"| {METHOD_LABELS[method]} | {cells} |")
    lines.append("")
    lines += [f"- {name}: {format_figure(value)}" for name, value in metrics["contrasts"].items()]
    return "\n".join(lines)
