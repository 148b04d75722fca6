"""Figure: training loss and accuracy-vs-length at several checkpoints for the long runs."""
# usage: python checkpoint_curves.py OUT.png [RUNS_DIR]  (RUNS_DIR holds long_<task>/ and long_<task>_at_<step>/ from reproduce_long_runs.sh)
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

root = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/table2")
tasks = {"cycle_navigation": 100.0, "modular_arithmetic": 36.4}
steps = [2500, 5000, 10000, 20000, 40000]
fig, axes = plt.subplots(2, 2, figsize=(12, 8))
summary = {}
for column, (task, paper) in enumerate(tasks.items()):
    log = [json.loads(l) for l in open(root / f"long_{task}" / "train_log.jsonl")]
    s = np.array([r["step"] for r in log]); loss = np.array([r["loss"] for r in log])
    window = 50
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax = axes[0, column]
    ax.plot(s, loss, color="0.85", linewidth=0.5, label="logged steps")
    ax.plot(s[window - 1:], smooth, color="C0", label=f"moving mean of {window}")
    ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("training loss (nats)")
    ax.set_title(f"{task}: training loss (hidden 64, lengths 1..40)")
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
    ax = axes[1, column]
    summary[task] = {}
    for k, step in enumerate(steps):
        path = root / f"long_{task}_at_{step}" / "metrics.json"
        if not path.exists():
            continue
        m = json.load(open(path))
        summary[task][step] = {"score": m["score"], "min": min(m["accuracies"])}
        ax.plot(m["lengths"], 100 * np.array(m["accuracies"]), color=plt.cm.viridis(k / (len(steps) - 1)),
                label=f"step {step}: score {100 * m['score']:.1f}%")
    ax.axhline(paper, color="k", linestyle="--", linewidth=1, label=f"paper {paper}%")
    ax.set_ylim(0, 101); ax.set_xlabel("test length"); ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{task}: accuracy vs length at checkpoints")
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
fig.tight_layout()
out = Path(sys.argv[1])
fig.savefig(out, dpi=100)
print(json.dumps(summary, indent=1))
