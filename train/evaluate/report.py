"""The evaluation's figures and its HTML report (one self-contained folder, images beside it)."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from train.evaluate.service import outside_first

ORDER = ("qsnet", "resunet", "cgan", "swin", "physics", "voxel", "qsnet_scratch")
LABEL = {"qsnet": "QS-Net", "resunet": "Res-UNet", "cgan": "cGAN", "swin": "Swin", "physics": "Physics",
         "voxel": "Voxel regression (reference)", "qsnet_scratch": "QS-Net (scratch)"}
# the arms a cohort's tables and boxplots show, by model key; every other model is a "main" arm
ARM = {"physics": "physics", "voxel": "reference"}
TABLE_ARMS = ("main", "physics", "reference")
ERROR_WINDOW = 1024.0  # |error| shown from 0 to a quarter of the 12-bit range, the same for every model


def _models(present) -> list[str]:
    return [m for m in ORDER if m in present] + sorted(set(present) - set(ORDER))


# what each metric is measured in: on the 12-bit scale of the paper (L = 4095 by default)
UNITS = {"ssim": "", "psnr": "dB", "mae": "12-bit units"}
HEADING = {"ssim": "SSIM", "psnr": "PSNR (dB)", "mae": "MAE (12-bit units)"}


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 else f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(head: list[str], body: list[list]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{h}</tr>{b}</table>"


def _pm(values) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "–"
    # the sample sd (n - 1), as the paper's "mean ± sd" over subjects: with 3 subjects the
    # population sd reads 18 % smaller
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _boxplots(rows, fig_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cohorts = sorted({r["cohort"] for r in rows})
    for cohort in cohorts:
        sel = [r for r in rows if r["cohort"] == cohort and r["arm"] in TABLE_ARMS]
        models = _models({r["model"] for r in sel})
        contrasts = [c for c in ("t1w", "t2w", "t1flair", "t2flair", "swi") if any(r["contrast"] == c for r in sel)]
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
        for ax, metric in zip(axes, ("mae", "ssim", "psnr")):
            width = 0.8 / max(1, len(models))
            for i, m in enumerate(models):
                data = [[r[metric] for r in sel if r["model"] == m and r["contrast"] == c
                         and r[metric] is not None and math.isfinite(r[metric])] for c in contrasts]
                pos = [k + (i - (len(models) - 1) / 2) * width for k in range(len(contrasts))]
                bp = ax.boxplot([d or [np.nan] for d in data], positions=pos, widths=width * 0.9,
                                patch_artist=True, showfliers=False)
                for patch in bp["boxes"]:
                    patch.set_facecolor(plt.cm.tab10(i))
                ax.plot([], [], color=plt.cm.tab10(i), lw=6, label=LABEL.get(m, m))
            ax.set_xticks(range(len(contrasts)), contrasts)
            ax.set_title(f"{cohort}: {metric.upper()}")
            ax.set_ylabel(HEADING[metric], fontsize=8)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        name = f"boxplot_{cohort}.png"
        fig.savefig(fig_dir / name, dpi=90)
        plt.close(fig)
        files.append(name)
    return files


def _grid(ex, preds: dict, fig_dir: Path, cfg: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.evaluate.metrics import to_12bit

    if not preds:
        return None
    models = _models({m for m, _ in preds})
    contrasts = [c for c in ("t1w", "t2w", "t1flair", "t2flair", "swi") if any(k[1] == c for k in preds)]
    area = ex.regions["tumour"].sum(axis=(1, 2)) if "tumour" in ex.regions else ex.brain.sum(axis=(1, 2))
    z = int(np.argmax(area))
    cols = 3 + 2 * len(models)
    L = float(cfg["data_range"])
    err_window = ERROR_WINDOW / 4095.0 * L
    fig, axes = plt.subplots(len(contrasts), cols, figsize=(1.3 * cols, 1.4 * len(contrasts)), squeeze=False)
    x = ex.input("mrf")[z]
    inputs = [f"MRF {r_ms:g} ms/{t}" if (r_ms := ex.scale(role).get("rate_ms")) else f"MRF {t} (scaled)"
              for role, t in (("mrf_t1", "T1"), ("mrf_t2", "T2"))]
    for row, c in enumerate(contrasts):
        truth = to_12bit(ex.truth(c)[z] * ex.brain[z], L)
        # the model's inputs as it sees them: relaxation rates (prepare's normalise.inputs: rate),
        # so CSF is dark where a T1 or T2 map would show it bright
        panels = [(x[0], inputs[0], "gray", (0, 1)), (x[1], inputs[1], "gray", (0, 1)),
                  (truth, f"{c} truth", "gray", (0, L))]
        for m in models:
            p = preds.get((m, c))
            if p is None:
                panels += [(None, LABEL.get(m, m), None, (0, 1)), (None, "|error|", None, (0, 1))]
                continue
            s = to_12bit(p[z], L)
            panels += [(s, LABEL.get(m, m), "gray", (0, L)), (np.abs(s - truth), "|error|", "magma",
                                                              (0, err_window))]
        for col, (img, title, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[row, col]
            if img is None:  # no prediction: never a black panel that reads as a perfect one
                ax.set_facecolor("#ddd")
                ax.text(0.5, 0.5, "not\nevaluated", ha="center", va="center", fontsize=6, transform=ax.transAxes)
            else:
                ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0 or col == 2:
                ax.set_title(title if row == 0 else c, fontsize=7)
    fig.suptitle(f"{ex.cohort} {ex.subject} ({ex.health or 'subject'}), slice {z}; inputs 0-1, images 0-{L:.0f}, "
                 f"|error| 0-{err_window:.0f}", fontsize=8)
    fig.tight_layout()
    name = f"grid_{ex.cohort}_{ex.subject}.png"
    fig.savefig(fig_dir / name, dpi=90)
    plt.close(fig)
    return name


def write(folder: Path, rows, region_rows, tables, checks, summary, grids, exams, home: str) -> None:
    fig_dir = folder / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    boxes = _boxplots(rows, fig_dir)
    grid_files = [g for ex in exams if (ex.site, ex.subject) in grids
                  for g in [_grid(ex, grids[(ex.site, ex.subject)], fig_dir, summary["provenance"]["evaluate_params"])]
                  if g]
    prov = summary["provenance"]
    cfg = prov["evaluate_params"]
    parts = ["<!doctype html><meta charset='utf-8'><title>qsnet evaluation</title>",
             "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
             ".fail{color:#b00}.pass{color:#070}img{max-width:100%}</style>",
             "<h1>qsnet evaluation</h1>",
             f"<p>Every number below comes from data version <code>{_fmt(prov['data_version'])}</code> "
             f"(data.dvc md5), git commit <code>{_fmt(prov['git_commit'])}</code>, profile "
             f"<code>{_fmt(prov['profile'])}</code>, evaluation params <code>{prov['evaluate_params_hash']}</code>, "
             f"models trained with params <code>{', '.join(prov['model_params_hashes']) or '–'}</code>"
             f"{' (the working tree had uncommitted changes)' if prov.get('git_dirty') else ''}. "
             f"Metrics as the paper defines them: L = {cfg['data_range']:g}, K1 = {cfg['k1']:g}, K2 = {cfg['k2']:g}, "
             "inside the brain mask, on the prepared grid, each pooled over the brain voxels of a subject's whole "
             "volume (not averaged over slices); MAE also in scanner units in subjects.csv. A subject is a "
             "patient: the exams of one patient's visits are averaged before any mean, sd or paired test "
             "(subjects.csv lists each exam).</p>"]

    parts.append("<h2>Checks</h2>")
    body = []
    for ch in checks:
        cls = "pass" if ch["passed"] else "fail"
        val = ch["value"]
        # a pair is (the model the check names first, the other): "QS-Net ... beats the physics
        # baseline", "... with mrf inputs beats mri inputs"
        val = "; ".join(f"{k.upper() + ' ' if k else ''}{_fmt(v if not isinstance(v, list) else f'{v[0]:.3f} vs {v[1]:.3f}')}"
                        f"{' ' + UNITS[k] if UNITS.get(k) else ''}"
                        for k, v in (val.items() if isinstance(val, dict) else [("", val)]))
        body.append([html.escape(ch["check"]), ch["contrast"], val, f"<b class={cls}>{'pass' if ch['passed'] else 'FAIL'}</b>",
                     html.escape(ch.get("note") or "")])
    parts.append(_table(["check", "contrast", "value(s): the model the check names first vs the other", "",
                         "why (from the model cards)"], body))
    failed = [c for c in checks if not c["passed"]]
    if failed:
        why = ["Where a check fails, the numbers are what this data and these models give; the check is not "
               "changed to pass. The last column gives what the model cards show."]
        if prov.get("profile") == "demo":
            why.append("On the demo profile each model trains for about 150 steps on a CPU at 64 x 64 pixels "
                       "(params.yaml).")
        blur = tables.get("blur") or {}
        if blur.get("ssim"):
            cells = "; ".join(f"{cohort}: " + ", ".join(f"{c} {_fmt(v)}" for c, v in sorted(per.items()))
                              for cohort, per in sorted(blur["ssim"].items()))
            why.append(f"How demanding SSIM is on this grid: the ground truth blurred by a Gaussian of "
                       f"{blur['sigma_px']:g} pixel scores, against itself, {cells}.")
        why.append("The voxel-regression reference (below) tells the two causes apart: where it reaches a bar "
                   "that QS-Net misses, the MRF maps carry the contrast and the network has not learned it; "
                   "where it also falls short, the maps carry too little of it.")
        parts.append("<p class=fail>" + " ".join(why) + "</p>")

    by = defaultdict(list)
    for r in rows:
        by[(r["cohort"], r["arm"], r["model"], r["contrast"])].append(r)
    for cohort in sorted({r["cohort"] for r in rows}):
        parts.append(f"<h2>{html.escape(cohort)}: models against ground truth (mean ± sd over test subjects)</h2>")
        contrasts = [c for c in ("t1w", "t2w", "t1flair", "t2flair", "swi")
                     if any(k[0] == cohort and k[3] == c for k in by)]
        models = _models({k[2] for k in by if k[0] == cohort and k[1] in TABLE_ARMS})
        for metric in ("ssim", "psnr", "mae"):
            body = []
            for m in models:
                arm = ARM.get(m, "main")
                body.append([LABEL.get(m, m)] + [_pm([r[metric] for r in by.get((cohort, arm, m, c), [])])
                                                 for c in contrasts])
            parts.append(f"<h3>{HEADING[metric]}</h3>" + _table(["model"] + contrasts, body))
        st = tables["stats"]["qsnet_vs"].get(cohort, {})
        if st:
            body = [[LABEL.get(m, m)] + [
                "<br>".join(f"{k}: W {_fmt(v[k]['wilcoxon_p'])} / t {_fmt(v[k]['ttest_p'])}"
                            for k in ("ssim", "psnr", "mae")) if (v := st[m].get(c)) else "–" for c in contrasts]
                    for m in _models(st)]
            parts.append("<h3>QS-Net against each model: paired p-values over subjects "
                         "(Wilcoxon signed-rank / paired t)</h3>" + _table(["model"] + contrasts, body))
        ts = tables["stats"]["two_stage_vs_scratch"].get(cohort)
        if ts:
            body = [[c, _fmt(v["ssim"]["mean_a"]), _fmt(v["ssim"]["mean_b"]), _fmt(v["ssim"]["wilcoxon_p"]),
                     _fmt(v["ssim"]["ttest_p"])] for c, v in sorted(ts.items())]
            parts.append("<h3>Two-stage (pretrain + finetune) against site-B-from-scratch, SSIM</h3>"
                         + _table(["contrast", "two-stage", "scratch", "Wilcoxon p", "t-test p"], body))
    for f in boxes:
        parts.append(f"<p><img src='figures/{f}' alt='{f}'></p>")

    gen = tables["generalisation"]
    if gen:
        parts.append("<h2>Generalisation: trained on site A only, tested on another site, mrf against mri "
                     "inputs (the paper's figure 5)</h2>")
        parts.append("<p>Both input kinds are scored on the same voxels: the brain where the target and the "
                     "mri inputs (T1w and T2w) all have a series covering them. Elsewhere an mri-input model "
                     "would be fed zeros it never saw in training.</p>")
        body = []
        for arch in _models(gen):
            g = gen[arch]
            for c in sorted(set(g["mrf"]) | set(g["mri"])):
                p = g["p_values"].get(c, {}).get("ssim", {})
                body.append([LABEL.get(arch, arch), c] + [_fmt(g[k].get(c, {}).get(m)) for k in ("mrf", "mri")
                                                          for m in ("ssim", "psnr", "mae")]
                            + [_fmt(p.get("wilcoxon_p")), _fmt(p.get("ttest_p"))])
        parts.append(_table(["model", "contrast", "mrf SSIM", "mrf PSNR", "mrf MAE", "mri SSIM", "mri PSNR",
                             "mri MAE", "SSIM Wilcoxon p", "SSIM t-test p"], body))
        by_region = tables.get("generalisation_regions") or {}
        body = [[html.escape(cohort), LABEL.get(arch, arch), c, reg.replace("_", " "), _fmt(v["mrf"]), _fmt(v["mri"]),
                 "mrf" if v["mrf"] > v["mri"] else "mri" if v["mri"] > v["mrf"] else "–", v["n"]]
                for cohort, archs in sorted(by_region.items()) for arch in _models(archs)
                for c, regs in sorted(archs[arch].items())
                for reg in outside_first(regs) for v in [regs[reg]]]
        if body:
            parts.append("<p>The same pairs inside each lesion region of the phantom's labels and in the brain "
                         "away from them (<i>outside lesions</i>: beyond the SSIM window's 5-pixel reach), SSIM "
                         "on the exams both were scored on, means over their subjects. The site-A training "
                         "exams are healthy: neither input kind has seen a lesion, and the whole-brain result "
                         "above mixes how each generalises to healthy tissue of another site with how it "
                         "extrapolates to lesions.</p>"
                         + _table(["cohort", "model", "contrast", "region", "mrf SSIM", "mri SSIM", "better",
                                   "subjects"], body))
        copies = tables.get("copies") or {}
        body = [[html.escape(cohort), c, src, _fmt(v["ssim"]), _fmt(v["psnr"]), _fmt(v["mae"])]
                for cohort, by_c in sorted(copies.items()) for c, srcs in sorted(by_c.items())
                for src, v in sorted(srcs.items())]
        if body:
            parts.append("<p>An mri-input model can copy one of its inputs. Each input scored as it is, as the "
                         "prediction of the contrasts above, shows how far that copy alone goes (not a model of "
                         "the study, not in the contract files):</p>"
                         + _table(["cohort", "contrast", "mri input copied", "SSIM", "PSNR", "MAE"], body))

    if region_rows:
        parts.append("<h2>Lesions: metrics inside the tumour, enhancing rim and oedema (and in the brain outside "
                     "them), and lesion contrast against normal-appearing white matter ((lesion − NAWM) / NAWM), "
                     "true against synthetic</h2>")
        agg = defaultdict(list)
        for r in region_rows:
            if r["arm"] in TABLE_ARMS:
                agg[(r["cohort"], r["model"], r["region"], r["contrast"])].append(r)
        lesions = tables.get("lesions") or {}
        body = []
        for (cohort, m, reg, c), rs in sorted(agg.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1])
                                                                           if kv[0][1] in ORDER else 99, kv[0][2:])):
            cell = lesions.get(cohort, {}).get(m, {}).get(c, {}).get(reg, {})
            body.append([cohort, LABEL.get(m, m), reg, c, _pm([r["ssim"] for r in rs]), _pm([r["mae"] for r in rs]),
                         _pm([r["contrast_truth"] for r in rs]), _pm([r["contrast_synth"] for r in rs]),
                         _fmt(cell.get("kept"), 2), cell.get("verdict") or "–"])
        lost = [f"{cohort}: {reg} on {c}, {_fmt(cell['truth'], 2)} true, {_fmt(cell['synth'], 2)} synthetic"
                for cohort, models in sorted(lesions.items())
                for c, regs in sorted(models.get("qsnet", {}).items())
                for reg, cell in sorted(regs.items()) if cell["verdict"] in ("erased", "faint", "inverted")]
        parts.append("<p>A synthesis can score well over the brain and still lose a lesion, the failure that "
                     "matters to a reader. <i>kept</i> is the synthetic lesion contrast over the true one, where "
                     "the true one is at least 0.2: <i>erased</i> under 0.25, <i>faint</i> under 0.5, "
                     "<i>exaggerated</i> over 2, <i>inverted</i> below 0."
                     + (f" <b class=fail>QS-Net renders {len(lost)} lesion contrast(s) erased, faint or "
                        f"inverted</b>: {'; '.join(lost)}." if lost else "") + "</p>")
        parts.append(_table(["cohort", "model", "region", "contrast", "SSIM", "MAE", "contrast (truth)",
                             "contrast (synthetic)", "kept", "verdict"], body))

    parts.append("<h2>Images</h2><p>Ground truth, each model's synthesis and its absolute error, same slice, "
                 "same window.</p>")
    parts.extend(f"<p><img src='figures/{g}' alt='{g}'></p>" for g in grid_files)
    if summary["physics"]:
        body = [[k, _fmt(v["a"]), _fmt(v["b"]), v["voxels"]] for k, v in sorted(summary["physics"].items())]
        parts.append("<h2>Physics baseline fits</h2><p>Each contrast from the MRF T1/T2 maps by its signal "
                     "equation with the site's protocol, one linear intensity mapping a·s + b fitted on the "
                     "site's training exams.</p>" + _table(["site/contrast", "a", "b", "voxels"], body))
    if summary.get("reference"):
        body = [[k, v["voxels"], v["iterations"], v["features"]] for k, v in sorted(summary["reference"].items())]
        parts.append("<h2>Voxel-regression reference</h2><p>Not a model of the study: gradient-boosted trees "
                     "from the MRF T1 and T2 maps at each voxel, the maps smoothed at "
                     f"{' and '.join(f'{s:g}' for s in next(iter(summary['reference'].values()))['sigmas_px'])} "
                     "pixels and their gradient magnitude, to the target, fitted on the site's training exams "
                     "like the physics baseline. It measures how much of each contrast the maps carry near a "
                     "voxel; a network sees a wider context, so it is a reference, not an upper bound. It is not "
                     "in metrics.json.</p>" + _table(["site/contrast", "voxels", "trees", "features"], body))
    t = summary["timing"]
    parts.append(f"<h2>Run</h2><p>{t['pairs']} model × subject × contrast evaluations in {t['total_s']:.1f} s "
                 f"({t['per_model_subject_contrast_s'] * 1000:.0f} ms each).</p>")
    if summary["errors"]:
        parts.append("<h2>Not evaluated</h2><ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in summary["errors"])
                     + "</ul>")
    (folder / "report.html").write_text("\n".join(parts) + "\n")
