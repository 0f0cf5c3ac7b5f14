#!/usr/bin/env python3
"""Plots an el_bench results JSON (shared/WORKLOADS.md) into a PNG next to it.

With a token sweep (el_bench --sweep: records at several token counts) it draws HT bandwidth (GB/s) vs
tokens per rank and LL latency (us) vs tokens per rank, one line per workload, library (and SM count) and
routing, with the floor as a dashed line where known. Otherwise it draws bars of each figure's time with
its floor.

Usage: python3 bench/plot.py RESULTS.json [--out PNG]
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data, data.get("records", [])


def title_of(data):
    peer = data.get("peer_copy_gbps")
    peer_s = f", peer copy {peer:.0f} GB/s" if peer else ""
    return (f"{data.get('card', '?')} x{data.get('gpus', '?')}, {data.get('date', '?')}, "
            f"commit {data.get('commit', '?')}{peer_s}")


def impl_label(r):
    """The library, with its SM count where it states one (one line or bar per SM count)."""
    return r["library"] + (f" {r['sms']} SMs" if r.get("sms") else "")


def series(records, family):
    """{(workload, library [SMs], routing): [(tokens, record), ...]} for one family ("ht" / "ll")."""
    out = defaultdict(list)
    for r in records:
        if r["workload"].startswith(family + "_"):
            out[(r["workload"], impl_label(r), r["routing"])].append((r["tokens"], r))
    for v in out.values():
        v.sort(key=lambda p: p[0])
    return out


def is_sweep(records):
    return any(len(v) > 1 for fam in ("ht", "ll") for v in series(records, fam).values())


def plot_sweep(data, records, png):
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, family, key, ylabel in ((axes[0], "ht", "gbps", "GB/s (logical bytes / time)"),
                                    (axes[1], "ll", "us", "latency, us (slowest rank's median)")):
        floors = {}
        for (workload, library, routing), pts in sorted(series(records, family).items()):
            xs = [t for t, _ in pts]
            ys = [r[key] for _, r in pts]
            style = "-" if routing == "uniform" else ":"
            ax.plot(xs, ys, style, marker="o", ms=3, label=f"{workload} {library} {routing}")
            if all(r.get("floor_us") for _, r in pts):
                fl = [r["bytes"] / (r["floor_us"] * 1e3) if key == "gbps" else r["floor_us"] for _, r in pts]
                floors[(workload, routing)] = (xs, fl)
        for (workload, routing), (xs, fl) in sorted(floors.items()):
            ax.plot(xs, fl, "--", lw=0.8, color="gray")
        ax.set_xscale("log", base=2)
        if key == "us":
            ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(ylabel)
        ax.set_title(("HT bandwidth" if family == "ht" else "LL latency") + " (dashed: floor)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title_of(data))
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def plot_bars(data, records, png):
    keys = sorted({(r["workload"], r["routing"], r["tokens"]) for r in records})
    libraries = sorted({impl_label(r) for r in records}, key=lambda l: (l != "nccl", l))
    width = 0.8 / max(1, len(libraries))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(keys)), 6))
    for i, lib in enumerate(libraries):
        by_key = {(r["workload"], r["routing"], r["tokens"]): r for r in records if impl_label(r) == lib}
        xs = [k + i * width for k in range(len(keys))]
        ys = [by_key[k]["us"] if k in by_key else 0 for k in keys]
        bars = ax.bar(xs, ys, width, label=lib)
        for b, k in zip(bars, keys):
            if k in by_key:
                ax.annotate(f"{by_key[k]['gbps']:.0f} GB/s", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=6)
    for k_i, k in enumerate(keys):
        fl = next((r.get("floor_us") for r in records
                   if (r["workload"], r["routing"], r["tokens"]) == k and r.get("floor_us")), None)
        if fl:
            ax.hlines(fl, k_i - width / 2, k_i + 0.8 - width / 2, colors="gray", linestyles="--", lw=1)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{w}\n{r} {t}t" for w, r, t in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("us (slowest rank's median; dashed: floor)")
    ax.set_title(title_of(data))
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--out", help="PNG path (default: the JSON's path with .png)")
    a = p.parse_args(argv)
    data, records = load(a.results)
    if not records:
        print(f"plot: {a.results} has no records", file=sys.stderr)
        return 1
    png = a.out or os.path.splitext(a.results)[0] + ".png"
    (plot_sweep if is_sweep(records) else plot_bars)(data, records, png)
    print(f"plot: wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
