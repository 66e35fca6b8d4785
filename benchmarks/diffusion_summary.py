"""Summarise guided-distillation runs against the issue's targets (the tables of docs/diffusion.md).

  python -m benchmarks.diffusion_summary --digits workdirs/diffusion/digits --mixture workdirs/diffusion/2d

Reads each work directory's results.json (written by experiments.guided_distill) and prints markdown: for the
digits, FD of the 256-step guided teacher, its own 4-step DDIM, the stage-1 student and the 1/2/4/8-step
students at every w, clipping off and on, with the two FD targets checked; for the 2-D mixture, the fraction
of samples nearest their own class and the sliced Wasserstein distance per w; the stage wall-clock times.
Whatever the numbers say is what is printed.
"""

import argparse
import json
import os


def _load(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _pick(rows, model, steps, w, clip):
    for r in rows:
        if r["model"] == model and r["steps"] == steps and r["w"] == w and r["clip"] == clip:
            return r
    return None


def _students(rows):
    return sorted({r["steps"] for r in rows if r["model"] == "student"}, reverse=True)


def digits_tables(record) -> str:
    rows = record["rows"]
    ref = max(r["steps"] for r in rows if r["model"] == "teacher")
    stage1 = next(r["steps"] for r in rows if r["model"] == "stage1")
    ws = sorted({r["w"] for r in rows})
    out = []
    for clip in sorted({r["clip"] for r in rows}):
        head = (f"| w | teacher {ref} | teacher 4 | stage-1 {stage1} | "
                + " | ".join(f"student {n}" for n in _students(rows))
                + " | student 4 / teacher 256 | teacher 4 / student 4 | RMSE stage 1 / student 4 | acc / conf student 4 | P / R student 4 |")
        out += [f"**FD, clipping {'on' if clip else 'off'}** (real-data floor {record['real_data']['fd']:.3g})", "",
                head, "|" + "---|" * (head.count("|") - 1)]
        for w in ws:
            t_ref, t4 = _pick(rows, "teacher", ref, w, clip), _pick(rows, "teacher", 4, w, clip)
            s1, s4 = _pick(rows, "stage1", stage1, w, clip), _pick(rows, "student", 4, w, clip)
            cells = [f"{w:g}", f"{t_ref['fd']:.3g}", f"{t4['fd']:.3g}" if t4 else "", f"{s1['fd']:.3g}"]
            cells += [f"{_pick(rows, 'student', n, w, clip)['fd']:.3g}" for n in _students(rows)]
            within = s4["fd"] / t_ref["fd"]
            cells.append(f"{within:.2f} ({'meets' if within <= 1.10 else 'misses'} <= 1.10)")
            if t4:
                gain = t4["fd"] / s4["fd"]
                cells.append(f"{gain:.2f}" + (f" ({'meets' if gain >= 1.5 else 'misses'} >= 1.5)" if w >= 1 else ""))
            else:
                cells.append("")
            cells.append(f"{s1['rmse_to_teacher']:.3f} / {s4['rmse_to_teacher']:.3f}")
            cells.append(f"{s4['accuracy']:.3f} / {s4['confidence']:.3f}")
            cells.append(f"{s4['precision']:.2f} / {s4['recall']:.2f}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def mixture_table(record) -> str:
    rows = record["rows"]
    ref = max(r["steps"] for r in rows if r["model"] == "teacher")
    stage1 = next(r["steps"] for r in rows if r["model"] == "stage1")
    cols = [("teacher", ref), ("teacher", 4), ("stage1", stage1)] + [("student", n) for n in _students(rows)]
    real = record["real_data"]
    out = [f"**2-D mixture: fraction nearest their own class / sliced Wasserstein** (real data: "
           f"{real['own_class']:.3f} / {real['sw']:.3f})", "",
           "| w | " + " | ".join(f"{m} {n}" for m, n in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for w in sorted({r["w"] for r in rows}):
        cells = []
        for m, n in cols:
            r = _pick(rows, m, n, w, False)
            cells.append(f"{r['own_class']:.3f} / {r['sw']:.3f}" if r else "")
        out.append(f"| {w:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def times_table(records) -> str:
    out = ["| run | stage | seconds | 1-min load start / end |", "|---|---|---|---|"]
    for name, record in records.items():
        total = 0.0
        order = lambda k: (["teacher", "classifier", "stage1"] + [k]).index(k) * 10_000 - int(k.split("_n")[-1] if "_n" in k else 0)
        for stage, t in sorted(record["stage_times"].items(), key=lambda kv: order(kv[0])):
            total += t["seconds"]
            out.append(f"| {name} | {stage} | {t['seconds']:.0f} | {t['load_start']:.1f} / {t['load_end']:.1f} |")
        out.append(f"| {name} | all training stages | {total:.0f} | |")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", default="")
    parser.add_argument("--mixture", default="")
    args = parser.parse_args()
    records = {}
    if args.mixture:
        records["2-D"] = _load(args.mixture)
        print(mixture_table(records["2-D"]))
    if args.digits:
        records["digits"] = _load(args.digits)
        print(digits_tables(records["digits"]))
    print(times_table(records))


if __name__ == "__main__":
    main()
