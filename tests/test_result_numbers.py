"""The headline numbers of the README and the docs pages against the committed files they come from
(results/*/report.md, generalization.md, per_layer.md, launch.json, run records, benchmarks/results/*.md), so that a
regenerated result or a rerun benchmark cannot leave the README stale without a failing test.

Each check finds a README phrase (whitespace-insensitive), reads the numbers in it, and recomputes them from the file;
a number agrees when the file's value rounds to it at the README's precision. When a check fails, either the README
or the result changed: update the README's sentence (and this test's phrase, if the wording changed).
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS, BENCH = ROOT / "results", ROOT / "benchmarks" / "results"
NUM = r"[−+-]?[\d,]*\.?\d+(?:e[−+-]?\d+)?"


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# the README and the docs pages its sections moved to (not the folders docs/ links in: results, benchmarks, ...)
DOC_PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md")
                                          if not any((ROOT / "docs" / part).is_symlink()
                                                     for part in p.relative_to(ROOT / "docs").parts[:1]))
README = flat("\n".join(p.read_text() for p in DOC_PAGES))
PER_LAYER_DOC = flat((ROOT / "docs" / "per-layer.md").read_text())


def number(text: str) -> float:
    return float(text.replace("−", "-").replace(",", "").replace("+", ""))


def agrees(text: str, value: float) -> bool:
    """``value`` rounds to the README's ``text`` at its precision (decimals, or 2 significant digits in e-notation)."""
    text = text.strip()
    if "e" in text:
        mantissa = text.replace("−", "-").split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return f"{value:.{digits}e}" == f"{number(text):.{digits}e}"
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(value - number(text)) <= 0.5 * 10 ** -decimals + 1e-12


def check(text: str, value: float, what: str) -> None:
    assert agrees(text, value), f"README says {text} for {what}; the file says {value!r}"


def phrase(pattern: str, text: str = README) -> re.Match:
    """The README's sentence as a regex (``NUM`` groups for numbers); fails, naming it, when the README lost it."""
    m = re.search(pattern, text)
    assert m, f"the README no longer has a sentence matching {pattern!r}: update the sentence or this test"
    return m


def table(path: Path, header_start: str) -> list[dict]:
    """The markdown table of ``path`` whose header row starts with ``header_start``, as dicts keyed by the header."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def interval(text: str) -> tuple[float, float]:
    low, high = re.match(rf"\[({NUM}), ({NUM})\]", text.replace(" to ", ", ")).groups()
    return number(low), number(high)


def launch_seconds(study: str) -> float:
    launches = json.loads((RESULTS / study / "launch.json").read_text())["launches"]
    return sum(launch["wall_seconds"] for launch in launches)


def final_evals(study: str) -> list[dict]:
    out = []
    for records in sorted((RESULTS / study).glob("*/records.jsonl")):
        evals = [r for r in map(json.loads, records.read_text().splitlines()) if r.get("kind") == "eval"]
        out.append(evals[-1])
    return out


# -- BatchNorm: the exploratory and confirmatory tables ------------------------------------------------------------

BN_METRICS = {
    "final training loss": "final train loss (cross-entropy, whole training subset)",
    "final test accuracy": "final test accuracy",
    "final test loss": "final test loss (cross-entropy, test set)",
    "effective β, median over probes": "effective β, median over probes",
    "effective β, 90th percentile": "effective β, 90th percentile over probes",
    "loss range width, median": "loss range width, median over probes of loss_max − loss_min",
    "gradient predictiveness, median": "gradient predictiveness, median over probes of grad_pred_max",
    "final sharpness, 256-image Hessian": "final sharpness λ_max(∇²L)",
    "final local smoothness": "final local smoothness ‖∇f(w+u) − ∇f(w)‖₂ / ‖u‖₂",
}


@pytest.mark.parametrize("readme_metric", list(BN_METRICS))
def test_bn_exploratory_and_confirmatory_rows(readme_metric):
    m = phrase(rf"\| {re.escape(readme_metric)} \| ({NUM}) \(({NUM})\) \| ({NUM}) \[({NUM}), ({NUM})\] \(({NUM})\) \| "
               rf"(yes|no) \|")
    explore = {r["metric"]: r for r in table(RESULTS / "fashion-mnist-bn" / "report.md", "| metric | Δ |")}
    confirm = {r["metric"]: r for r in table(RESULTS / "fashion-mnist-bn-confirm" / "report.md", "| metric | Δ |")}
    e, c = explore[BN_METRICS[readme_metric]], confirm[BN_METRICS[readme_metric]]
    check(m[1], number(e["Δ"]), f"{readme_metric}: exploratory Δ")
    check(m[2], number(e["p (Holm)"]), f"{readme_metric}: exploratory Holm p")
    check(m[3], number(c["Δ"]), f"{readme_metric}: confirmatory Δ")
    low, high = interval(c["95% CI (t)"])
    check(m[4], low, f"{readme_metric}: CI low")
    check(m[5], high, f"{readme_metric}: CI high")
    check(m[6], number(c["p (Holm)"]), f"{readme_metric}: confirmatory Holm p")
    assert m[7] == c["Holm < 0.05"], f"{readme_metric}: README says confirmed = {m[7]}, the report {c['Holm < 0.05']}"


def test_test_loss_range_over_both_bn_studies():
    m = phrase(rf"test loss is now ({NUM})–({NUM}) for every run")
    losses = [e["test_loss"] for s in ("fashion-mnist-bn", "fashion-mnist-bn-confirm") for e in final_evals(s)]
    assert len(losses) == 20
    check(m[1], min(losses), "lowest final test loss")
    check(m[2], max(losses), "highest final test loss")


# -- sharpness versus generalisation -------------------------------------------------------------------------------

GEN_MEASURES = {
    "ε-sharpness (Keskar)": "epsilon_sharpness", "λ_max": "lambda_max", "PAC-Bayes flatness 1/σ²": "pacbayes_flatness",
    "Hessian trace": "hessian_trace", "PAC-Bayes magnitude-aware 1/σ′²": "pacbayes_mag_flatness",
    "average-case adaptive sharpness": "average_case_sharpness", "path norm": "path_norm",
    "worst-case adaptive sharpness": "worst_case_sharpness", "relative flatness (Petzka)": "relative_flatness",
    "distance to initialisation": "distance_to_init", "log spectral-norm product": "spectral_product_log",
}
GENERALIZATION = RESULTS / "generalization" / "generalization.md"


@pytest.mark.parametrize("name", list(GEN_MEASURES))
def test_generalization_table_row(name):
    m = phrase(rf"\| {re.escape(name)} \| ({NUM}) \[({NUM}), ({NUM})\] \| ({NUM}) \[({NUM}), ({NUM})\] \| "
               rf"({NUM}) / ({NUM}) \| ({NUM}) \|")
    row = {r["measure"]: r for r in table(GENERALIZATION, "| measure | n | τ |")}[GEN_MEASURES[name]]
    expected = [number(row["τ"]), *interval(row["τ 95% CI"]), number(row["Ψ"]), *interval(row["Ψ 95% CI"]),
                number(row["τ at η=0.05"]), number(row["τ at η=0.2"]), number(row["τ over configuration means"])]
    columns = ["τ", "τ low", "τ high", "Ψ", "Ψ low", "Ψ high", "τ at η=0.05", "τ at η=0.2",
               "τ over configuration means"]
    for k, (column, value) in enumerate(zip(columns, expected), start=1):
        check(m[k], value, f"{name}: {column}")


def test_generalization_claims_among_the_highest_and_the_paired_comparison():
    rows = {r["measure"]: r for r in table(GENERALIZATION, "| measure | n | τ |")}
    top = ("epsilon_sharpness", "lambda_max", "pacbayes_flatness")
    m = phrase(rf"ε-sharpness, λ_max and PAC-Bayes flatness are \*among\* the highest \(τ ({NUM})–({NUM}), "
               rf"Ψ ({NUM})–({NUM})")
    taus, psis = [number(rows[k]["τ"]) for k in top], [number(rows[k]["Ψ"]) for k in top]
    check(m[1], min(taus), "lowest τ of the three")
    check(m[2], max(taus), "highest τ of the three")
    check(m[3], min(psis), "lowest Ψ of the three")
    check(m[4], max(psis), "highest Ψ of the three")
    assert sorted(rows, key=lambda k: -number(rows[k]["τ"]))[:3] == list(top)
    paired = {r["measure m"]: r for r in table(GENERALIZATION, "| measure m | Δτ |")}
    m = phrase(rf"ε-sharpness is ahead of λ_max by ({NUM}) \(95% CI ({NUM}) to ({NUM})\) and of PAC-Bayes 1/σ² by "
               rf"({NUM}) \(CI ({NUM}) to ({NUM})\), intervals that hold 0")
    for k, measure in ((1, "lambda_max"), (4, "pacbayes_flatness")):
        low, high = interval(paired[measure]["Δτ 95% CI"])
        check(m[k], number(paired[measure]["Δτ"]), f"Δτ against {measure}")
        check(m[k + 1], low, f"Δτ against {measure}: CI low")
        check(m[k + 2], high, f"Δτ against {measure}: CI high")
        assert paired[measure]["0 in Δτ CI"] == "yes"
    means = {k: number(r["τ over configuration means"]) for k, r in rows.items()}
    m = phrase(rf"averaged per configuration the order below it changes \(the trace ({NUM}), then λ_max and PAC-Bayes "
               rf"({NUM})\)")
    check(m[1], means["hessian_trace"], "τ over configuration means of the trace")
    check(m[2], means["lambda_max"], "τ over configuration means of λ_max")
    check(m[2], means["pacbayes_flatness"], "τ over configuration means of PAC-Bayes")
    assert means["hessian_trace"] > max(means["lambda_max"], means["pacbayes_flatness"])


# -- per-layer curvature ------------------------------------------------------------------------------------------

def test_per_layer_fc_and_conv1():
    tests = {(r["layer"], r["metric"]): r for r in table(RESULTS / "per-layer" / "per_layer.md", "| layer | metric |")}
    means = {(r["model"], r["layer"]): r for r in table(RESULTS / "per-layer" / "per_layer.md", "| model | layer |")}
    for text in (README, PER_LAYER_DOC):
        m = phrase(rf"fc \(classifier\) block's λ_max is lower with BatchNorm: ({NUM}) ± ({NUM}) vs ({NUM}) ± ({NUM}) "
                   rf"\(({NUM}), 95% CI ({NUM}) to ({NUM}), Holm p = ({NUM}), n = 3\)", text)
        bn, plain = (means[(model, "fc")]["λ_max(H)"].split(" ± ") for model in ("bn-convnet", "convnet"))
        fc = tests[("fc", "λ_max(H)")]
        for k, value in enumerate([*map(number, bn), *map(number, plain), number(fc["mean of b − a"]),
                                   *interval(f"[{fc['95% CI']}]"), number(fc["p (Holm)"])], start=1):
            check(m[k], value, f"per-layer fc, number {k}")
        m = phrase(rf"conv1's λ_max ends higher with BN \(.*?raw p = ({NUM}), Holm p = ({NUM})\)", text)
        check(m[1], number(tests[("conv1", "λ_max(H)")]["p (paired t)"]), "conv1 raw p")
        check(m[2], number(tests[("conv1", "λ_max(H)")]["p (Holm)"]), "conv1 Holm p")
    survivors = [k for k, r in tests.items() if number(r["p (Holm)"]) < 0.05]
    assert survivors == [("fc", "λ_max(H)"), ("fc", "λ_max(G)")]   # "the only difference that survives Holm"


def test_per_layer_products_per_block():
    m = phrase(rf"every run converged, ({NUM})–({NUM}) products per block", PER_LAYER_DOC)
    products = [r["n_hvp"] for f in (RESULTS / "per-layer").glob("*/records.jsonl")
                for r in map(json.loads, f.read_text().splitlines())
                if r.get("kind") == "per_layer" and r.get("layer") != "all"]
    check(m[1], min(products), "fewest products per block")
    check(m[2], max(products), "most products per block")


# -- wall times from launch.json ----------------------------------------------------------------------------------

def test_wall_times_of_the_committed_studies():
    m = phrase(rf"32 runs; (\d+) min (\d+) s on 2 cores")
    assert divmod(round(launch_seconds("generalization")), 60) == (int(m[1]), int(m[2]))
    m = phrase(rf"({NUM}) minutes of wall time on 2 cores shared with other jobs: ({NUM}) s in its `launch.json`")
    check(m[1], launch_seconds("fashion-mnist-bn-confirm") / 60, "confirmation study, minutes")
    check(m[2], launch_seconds("fashion-mnist-bn-confirm"), "confirmation study, seconds")
    m = phrase(rf"\(({NUM}) s in the launch's own `launch.json`\)")
    check(m[1], launch_seconds("fashion-mnist-bn"), "main study")
    m = phrase(rf"\(measured: ({NUM}) s\)")
    check(m[1], launch_seconds("edge-of-stability"), "edge of stability")
    m = phrase(rf"3 seeds, ({NUM}) s on 2 shared cores")
    check(m[1], launch_seconds("own-resnet"), "own ResNet")


# -- speed ratios from benchmarks/results -------------------------------------------------------------------------

def ratios(path: Path, header_start: str, column: str, where=lambda row: True) -> list[float]:
    return [number(r[column].split()[0]) for r in table(path, header_start) if where(r)]


def check_range(m: re.Match, values: list[float], what: str, first: int = 1) -> None:
    check(m[first], min(values), f"{what}: low end")
    check(m[first + 1], max(values), f"{what}: high end")


def test_training_loop_and_gd_step_ratios():
    by_model = {r["model"]: number(r["ratio (target >= 0.9)"].split()[0])
                for r in table(BENCH / "training.md", "| model |")}
    m = phrase(rf"({NUM})× \(ConvNet\) and ({NUM})× \(BN-ConvNet\) of its steps per second")
    check(m[1], by_model["convnet"], "training loop, ConvNet")
    check(m[2], by_model["bn-convnet"], "training loop, BN-ConvNet")
    m = phrase(rf"\*\*({NUM})×\*\* \(target ≥ 0.9; \[gd_step.md\]")
    check(m[1], ratios(BENCH / "gd_step.md", "| hand-written loop", "ratio (target >= 0.9)")[0], "GD step")


def test_density_and_product_ratios():
    density = BENCH / "density.md"
    is_ = lambda name: lambda r: name in r["product"]  # noqa: E731
    m = phrase(rf"costs ({NUM})–({NUM})× PyHessian's double backward in that run")
    check_range(m, ratios(density, "| model | state | product |", "CPU / PyHessian", is_("Linearized")),
                "linearized product in the density run")
    m = phrase(rf"The ({NUM})–({NUM})× of the retained-graph product measured in the density run "
               rf"\(({NUM})–({NUM})× in three of its four rows\)")
    retained = ratios(density, "| model | state | product |", "CPU / PyHessian", is_("retained"))
    check_range(m, retained, "retained-graph product in the density run")
    above = [r for r in retained if r > 1]
    assert len(above) == 3
    check_range(m, above, "retained-graph product, the three rows above 1", first=3)
    spectral = lambda r: r["tool"] == "smoothness spectral_density"  # noqa: E731
    m = phrase(rf"in \*\*({NUM})–({NUM})× its CPU time\*\* \(({NUM})–({NUM})× wall\)")
    check_range(m, ratios(density, "| model | state | tool |", "CPU / PyHessian", spectral), "density, CPU")
    check_range(m, ratios(density, "| model | state | tool |", "wall / PyHessian", spectral), "density, wall", 3)
    tuned, default = BENCH / "density-products.md", BENCH / "density-products-default-allocator.md"
    m = phrase(rf"retained-graph product costs \*\*({NUM})–({NUM})×\*\* PyHessian's identical double backward "
               rf"\(({NUM})–({NUM})× with glibc's default allocator\), the linearized one ({NUM})–({NUM})× after a "
               rf"{NUM}–{NUM} s trace \(({NUM})–({NUM})× after")
    for first, path, product in ((1, tuned, "retained"), (3, default, "retained"), (5, tuned, "Linearized"),
                                 (7, default, "Linearized")):
        check_range(m, ratios(path, "| model | state | product |", "CPU / PyHessian", is_(product)),
                    f"{path.name}: {product}", first)


# -- gradient noise: the tutorial's table and the README's sentence against report.csv and launch.json -------------

GN_METRICS = {"norm test θ": "norm_test_median", "simple noise scale B_simple (finite measurements)":
              "noise_scale_median", "mean GSNR": "gsnr_median", "step quality α": "alpha_median",
              "gradient predictiveness (line probes)": "grad_predictiveness"}


def _gn_report() -> dict:
    import csv
    rows = list(csv.DictReader((RESULTS / "gradient-noise" / "report.csv").open()))
    return {(r["metric"], r["model"]): r for r in rows}


@pytest.mark.parametrize("label", list(GN_METRICS))
def test_gradient_noise_tutorial_table(label):
    page = flat((ROOT / "docs" / "tutorials" / "gradient-noise.md").read_text())
    m = phrase(rf"\| {re.escape(label)} \| ({NUM}) ± ({NUM}) \| ({NUM}) ± ({NUM}) \| ({NUM}) \[({NUM}), ({NUM})\] \| "
               rf"({NUM}) \|", page)
    rep = _gn_report()
    a, b = rep[(GN_METRICS[label], "convnet")], rep[(GN_METRICS[label], "bn-convnet")]
    for text, value in zip(m.groups(), (a["mean"], a["sd"], b["mean"], b["sd"], b["diff"], b["ci_low"], b["ci_high"],
                                        b["p_holm"])):
        check(text, float(value), f"{label} in the gradient-noise tutorial")


def test_gradient_noise_readme_sentence_and_wall_time():
    m = phrase(rf"norm test ({NUM}) ± ({NUM}) with BN vs ({NUM}) ± ({NUM}) without, simple noise scale ({NUM}) ± "
               rf"({NUM}) vs ({NUM}) ± ({NUM}), GSNR ({NUM}) vs ({NUM}); with 3 seeds none survives Holm \(({NUM}), "
               rf"({NUM}), ({NUM})\)")
    rep = _gn_report()
    bn = lambda metric, col: float(rep[(metric, "bn-convnet")][col])
    plain = lambda metric, col: float(rep[(metric, "convnet")][col])
    expected = (bn("norm_test_median", "mean"), bn("norm_test_median", "sd"), plain("norm_test_median", "mean"),
                plain("norm_test_median", "sd"), bn("noise_scale_median", "mean"), bn("noise_scale_median", "sd"),
                plain("noise_scale_median", "mean"), plain("noise_scale_median", "sd"), bn("gsnr_median", "mean"),
                plain("gsnr_median", "mean"), bn("norm_test_median", "p_holm"), bn("noise_scale_median", "p_holm"),
                bn("gsnr_median", "p_holm"))
    for text, value in zip(m.groups(), expected):
        check(text, value, "the README's gradient-noise sentence")
    minutes = phrase(rf"gradient-noise --workers 2 +# 6 runs; ({NUM}) min on 2 cores")
    check(minutes.group(1), launch_seconds("gradient-noise") / 60, "the gradient-noise study's wall time")
