"""Table 1 of Yoshida & Miyato 2017: test accuracy and generalization gap at threshold alpha,
from the runs of the paper runner, as Markdown and CSV (and parsed back, for checking).

Generalization gap at threshold alpha (the paper's definition): the minimum of
train accuracy - test accuracy over the epochs whose test accuracy exceeds alpha.  alpha is
given, or chosen per (dataset, model, regime) as the largest multiple of 0.01 strictly below
every run's best test accuracy, so that every method (and seed) exceeds it.  A run that never
exceeds a given alpha has no gap (NaN, shown as "n/a").

Test accuracy is that of the last epoch.  Values are mean +- sample standard deviation over
seeds (no std for one seed).
"""

import csv
import io
import math
import re
from typing import Dict, List, Optional, Sequence

ALPHA_STEP = 0.01
CSV_FIELDS = ["dataset", "model", "regime", "batch_size", "lr", "method", "alpha", "n_seeds",
              "test_acc_mean", "test_acc_std", "gap_mean", "gap_std", "n_gap"]


def gap_at_threshold(train_acc: Sequence[float], test_acc: Sequence[float],
                     alpha: float) -> float:
    """min over epochs with test_acc > alpha of (train_acc - test_acc); NaN if there is none."""
    if len(train_acc) != len(test_acc):
        raise ValueError(f"train and test curves differ in length: {len(train_acc)} != "
                         f"{len(test_acc)}")
    gaps = [tr - te for tr, te in zip(train_acc, test_acc) if te > alpha]
    return min(gaps) if gaps else float("nan")


def auto_alpha(best_test_accs: Sequence[float], step: float = ALPHA_STEP) -> float:
    """The largest multiple of step strictly below min(best_test_accs)."""
    if not best_test_accs:
        raise ValueError("no runs to choose alpha from")
    m = min(best_test_accs)
    k = math.floor(m / step)
    while k * step >= m:      # strictly below (and robust to m / step rounding up)
        k -= 1
    return round(k * step, 10)


def _mean_std(xs: List[float]):
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def summarize(runs: Sequence[dict], alpha: Optional[float] = None) -> List[dict]:
    """One row per (dataset, model, regime, method), in the runs' order.  Each run is a dict
    with dataset, model, regime, method, batch_size, lr and history (a list of epochs with
    train_acc and test_acc)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"], r["regime"], r["method"]), []).append(r)
    alphas: Dict[tuple, float] = {}
    if alpha is None:
        best: Dict[tuple, List[float]] = {}
        for r in runs:
            best.setdefault((r["dataset"], r["model"], r["regime"]), []).append(
                max(e["test_acc"] for e in r["history"]))
        alphas = {k: auto_alpha(v) for k, v in best.items()}
    rows = []
    for (ds, model, regime, method), rs in groups.items():
        a = alpha if alpha is not None else alphas[(ds, model, regime)]
        accs = [r["history"][-1]["test_acc"] for r in rs]
        gaps = [gap_at_threshold([e["train_acc"] for e in r["history"]],
                                 [e["test_acc"] for e in r["history"]], a) for r in rs]
        am, asd = _mean_std(accs)
        gm, gsd = _mean_std(gaps)
        rows.append(dict(dataset=ds, model=model, regime=regime, batch_size=rs[0]["batch_size"],
                         lr=rs[0]["lr"], method=method, alpha=a, n_seeds=len(rs),
                         test_acc_mean=am, test_acc_std=asd, gap_mean=gm, gap_std=gsd,
                         n_gap=sum(not math.isnan(g) for g in gaps)))
    return rows


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(r[k]) if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def to_markdown(rows: Sequence[dict], title: str = "Table 1") -> str:
    """One table per (dataset, model): a row per method; for each regime the test accuracy and
    the gap at threshold alpha.  The best value of each column is bold (highest accuracy,
    smallest gap)."""
    seeds = sorted({r["n_seeds"] for r in rows})
    lines = [f"# {title}: test accuracy and generalization gap", "",
             "Test accuracy at the last epoch; generalization gap at threshold α = the smallest "
             "train − test accuracy over the epochs whose test accuracy exceeds α. "
             f"Mean ± std over {'/'.join(map(str, seeds))} seed(s); the best of each column "
             "in bold.", ""]
    blocks: Dict[tuple, List[dict]] = {}
    for r in rows:
        blocks.setdefault((r["dataset"], r["model"]), []).append(r)
    for (ds, model), rs in blocks.items():
        regimes = list(dict.fromkeys(r["regime"] for r in rs))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        cell = {(r["regime"], r["method"]): r for r in rs}
        header, cols = ["method"], []
        for g in regimes:
            r0 = next(r for r in rs if r["regime"] == g)
            header += [f"test acc ({g}, B={r0['batch_size']})",
                       f"gap ({g}, B={r0['batch_size']}, α={r0['alpha']:.2f})"]
            cols += [(g, "test_acc", max), (g, "gap", min)]
        best = {}
        for g, key, pick in cols:
            vals = [cell[(g, m)][f"{key}_mean"] for m in methods if (g, m) in cell]
            vals = [round(v, 3) for v in vals if not math.isnan(v)]
            best[(g, key)] = pick(vals) if vals else None
        lines += [f"## {ds}, {model}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for m in methods:
            row = [m]
            for g, key, _ in cols:
                r = cell.get((g, m))
                if r is None:
                    row.append("")
                    continue
                text = _fmt(r[f"{key}_mean"], r[f"{key}_std"])
                if best[(g, key)] is not None and not math.isnan(r[f"{key}_mean"]) and \
                        round(r[f"{key}_mean"], 3) == best[(g, key)]:
                    text = f"**{text}**"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


_NUM = r"(n/a|-?\d+\.\d+(?: ± \d+\.\d+)?)"


def parse_markdown(text: str) -> List[dict]:
    """The cells of :func:`to_markdown`'s tables back as dicts (dataset, model, method, regime,
    batch_size, alpha, test_acc_mean/std, gap_mean/std; NaN for n/a or a missing std)."""
    out, block, header = [], None, None
    for line in text.splitlines():
        m = re.match(r"^## (.+), (.+)$", line)
        if m:
            block, header = (m.group(1), m.group(2)), None
            continue
        if not line.startswith("|") or block is None or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "method":
            header = cells
            continue
        if header is None:
            raise ValueError(f"table row before its header: {line!r}")
        rows: Dict[str, dict] = {}
        for h, c in zip(header[1:], cells[1:]):
            hm = re.match(r"^(test acc|gap) \((\w+), B=(\d+)(?:, α=([\d.]+))?\)$", h)
            if not hm:
                raise ValueError(f"unexpected column {h!r}")
            kind, regime, batch, alpha = hm.groups()
            r = rows.setdefault(regime, dict(dataset=block[0], model=block[1], method=cells[0],
                                             regime=regime, batch_size=int(batch)))
            if alpha is not None:
                r["alpha"] = float(alpha)
            c = c.replace("**", "")
            if not c:
                continue
            vm = re.fullmatch(_NUM, c)
            if not vm:
                raise ValueError(f"unexpected cell {c!r}")
            if c == "n/a":
                mean = std = float("nan")
            else:
                parts = c.split(" ± ")
                mean = float(parts[0])
                std = float(parts[1]) if len(parts) > 1 else float("nan")
            key = "test_acc" if kind == "test acc" else "gap"
            r[f"{key}_mean"], r[f"{key}_std"] = mean, std
        out += list(rows.values())
    return out


def parse_csv(text: str) -> List[dict]:
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        d = dict(r)
        for k in ("batch_size", "n_seeds", "n_gap"):
            d[k] = int(d[k])
        for k in ("lr", "alpha", "test_acc_mean", "test_acc_std", "gap_mean", "gap_std"):
            d[k] = float(d[k])
        rows.append(d)
    return rows
