"""One row of bench/results.md from a benchmark's last JSON line (called by bench/run_all).

    python bench/results_row.py NAME "TARGET" 'JSON' WHEN

The issue's main target is read from TARGET (">= 0.8 ..."); second targets are listed in SECOND.
"""
import json, re, sys
name, target, line, when = sys.argv[1:5]
d = json.loads(line) if line else {}
ratio = d.get("ratio")
thr = float(re.search(r"([0-9.]+)", target).group(1))
# Benchmarks whose "ratio" is only the smallest of figures with different targets (peers: Ray
# Data >= 1.0, Daft >= 0.5 / 0.25): their SECOND targets decide, not TARGET's first number.
PER_FIGURE = {"peers"}
lower = target.lstrip().startswith("<=")  # a cost ratio: smaller is better
met = isinstance(ratio, (int, float)) and (name in PER_FIGURE or (ratio <= thr if lower else ratio >= thr))
# The issues' second targets, checked from the same JSON line: (key, op, bound).
SECOND = {"ingest": [("ratio_fashion", ">=", 0.8), ("ratio_photos", ">=", 0.8)],
          "loader": [("loader_vs_training", ">=", 10.0), ("jpeg_224_images_per_s_per_core", ">=", 900.0),
                     ("png_224_images_per_s_per_core", ">=", 300.0), ("ratio_jpeg_224_vs_baseline", ">=", 0.8),
                     ("ratio_png_224_vs_baseline", ">=", 0.8)],
          "train": [("launch_overhead_s", "<=", 15.0)],
          "scale": [("first_task_s_1m", "<=", 30.0), ("ratio_images_per_s", ">=", 0.9)],
          "score": [("vs_naive", ">=", 20.0)],
          "peers": [("ratio_vs_ray_fashion", ">=", 1.0), ("ratio_vs_ray_photos", ">=", 1.0),
                    ("ratio_vs_daft_photos", ">=", 0.5), ("ratio_vs_daft_fashion", ">=", 0.25)]}
checks = []
for key, op, bound in SECOND.get(name, []):
    v = d.get(key)
    ok = isinstance(v, (int, float)) and (v >= bound if op == ">=" else v <= bound)
    met = met and ok
    checks.append(f"{key}={v} ({op} {bound}: {'yes' if ok else 'no'})")
other = ", ".join(checks + [f"{k}={v}" for k, v in d.items()
                            if k != "ratio" and k not in {c[0] for c in SECOND.get(name, [])}
                            and not isinstance(v, dict)])
verdict = "no (quick run, not a measurement)" if d.get("quick") else ("yes" if met else "no")
print(f"| {name} | {ratio if ratio is not None else '-'} | {target} | {verdict} | {when} | {other} |")
