"""Forecaster backtest on real rate series, and a replay of reactive vs forecast scaling.

1. Backtest: every model of autoscale/forecast.py on each series (rolling origin, refit
   daily on the trailing 7 days, 3 days of warm-up; autoscale/backtest.py): MAPE and
   peak-underprediction rate of the forecast 15 minutes ahead (the next whole step at or past
   15 min: 20 min on 10-minute data, 30 min on 30-minute data), median fit and update+predict
   time. The default model is chosen by ``choose_default``.
2. Replay: one series through the replica policy with a fluid queue (autoscale/replay.py),
   reactive-only vs forecast scaling, same policy; the picture goes to
   benchmarks/autoscale_replay.png.

Data: ../shared/data/rates (or TANDEM_RATES_DIR): Alibaba ServeGen aggregate rates and NAB
series, read in place. One torch thread (the LSTM), as on a small autoscaler pod.

    python benchmarks/autoscale.py                         # all series, about 3 minutes here
    python benchmarks/autoscale.py --series servegen/m-large --no-plot
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from autoscale.backtest import BacktestResult, backtest, choose_default
from autoscale.forecast import COMPLEXITY, build_forecaster
from autoscale.rate_series import RateSeries, load_nab, load_servegen, rates_dir
from autoscale.recommender import DEFAULT_CAPACITY_RPS, ReplicaPolicy
from autoscale.replay import ReplayConfig, ReplayTrace, forecast_maxima, replay

SERIES = ("servegen/m-large", "servegen/m-mid", "servegen/m-small", "nab/nyc_taxi",
          "nab/elb_request_count_8c0756", "nab/Twitter_volume_AAPL", "nab/Twitter_volume_AMZN")
HORIZON_S = 900.0
HERE = Path(__file__).resolve().parent


def load(root: Path, name: str) -> RateSeries:
    source, _, rest = name.partition("/")
    return load_servegen(root, rest) if source == "servegen" else load_nab(root, rest)


def run_backtests(series: list[RateSeries]) -> list[BacktestResult]:
    results = []
    for s in series:
        h = s.horizon(HORIZON_S)
        for model in COMPLEXITY:
            began = time.perf_counter()
            r = backtest(s.name, s.values, lambda m=model, s=s, h=h: build_forecaster(
                m, s.season, h), h, s.season)
            print(f"  {s.name:32s} {model:15s} MAPE {r.mape:7.1%}  peak-under "
                  f"{r.peak_underprediction:6.1%}  ({time.perf_counter() - began:.1f} s)",
                  flush=True)
            results.append(r)
    return results


def backtest_table(results: list[BacktestResult], series: list[RateSeries]) -> str:
    steps = {s.name: s for s in series}
    lines = ["| series | step | horizon | model | MAPE | peak-underprediction | points | "
             "fit (median) | update+predict (median) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = steps[r.series]
        lines.append(f"| {r.series} | {s.step_s / 60:.0f} min | "
                     f"{s.horizon(HORIZON_S) * s.step_s / 60:.0f} min | {r.model} | "
                     f"{r.mape:.1%} | {r.peak_underprediction:.1%} | {r.points} | "
                     f"{r.fit_s * 1e3:.1f} ms | {r.predict_us:.0f} us |")
    lines += ["", "| model | mean MAPE | mean peak-underprediction | score |",
              "| --- | --- | --- | --- |"]
    for model in COMPLEXITY:
        rs = [r for r in results if r.model == model]
        lines.append(f"| {model} | {np.mean([r.mape for r in rs]):.1%} | "
                     f"{np.mean([r.peak_underprediction for r in rs]):.1%} | "
                     f"{np.mean([r.score for r in rs]):.3f} |")
    return "\n".join(lines)


def run_replay(s: RateSeries, model: str, policy: ReplicaPolicy, config: ReplayConfig
               ) -> tuple[ReplayTrace, ReplayTrace, np.ndarray, float]:
    h = s.horizon(HORIZON_S)
    fc = forecast_maxima(s.values, build_forecaster(model, s.season, h), h, s.season)
    since = float(np.argmax(~np.isnan(fc)) * s.step_s)
    return replay(s.values, s.step_s, policy, None, config), replay(
        s.values, s.step_s, policy, fc, config), fc, since


def plot(s: RateSeries, reactive: ReplayTrace, forecast: ReplayTrace, fc: np.ndarray,
         since: float, model: str, policy: ReplicaPolicy, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Two days, picked where the policies differ most (queued request-minutes): the picture
    # shows the effect; the table gives the whole span, the rest included.
    day = 86_400
    starts = np.arange(since, reactive.time_s[-1] - 2 * day + 1, day)
    t = reactive.time_s
    diff = [(reactive.queue - forecast.queue)[(t >= a) & (t < a + 2 * day)].sum()
            for a in starts]
    start = float(starts[int(np.argmax(diff))]) if len(starts) else since
    window = (reactive.time_s >= start) & (reactive.time_s < start + 2 * day)
    hours = (reactive.time_s[window] - start) / 3600
    steps = np.arange(len(s.values)) * s.step_s
    sw = (steps >= start) & (steps < start + 2 * day)
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    axes[0].plot(hours, reactive.demand_rps[window], color="black", lw=1, label="arrivals")
    axes[0].step((steps[sw] - start) / 3600, fc[sw], where="post", color="tab:orange", lw=1,
                 label=f"{model}: max forecast over next {HORIZON_S / 60:.0f} min")
    axes[0].set_ylabel("requests/s")
    for ax, key, label in ((axes[1], "ready", "replicas serving"),
                           (axes[2], "queue", "queued requests")):
        ax.plot(hours, getattr(reactive, key)[window], color="tab:red", lw=1,
                label="reactive only")
        ax.plot(hours, getattr(forecast, key)[window], color="tab:blue", lw=1,
                label=f"forecast ({model})")
        ax.set_ylabel(label)
    for ax in axes:
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=100)
    axes[2].set_xlabel(f"hours from day {start / day:.0f} of the trace (the two days where "
                       "the policies differ most)")
    fig.suptitle(f"{s.name}: {policy.capacity_rps:g} req/s per replica, "
                 f"{policy.headroom:.0%} headroom, new replica serves after 10 min")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", action="append", default=None, help="e.g. nab/nyc_taxi")
    parser.add_argument("--replay-series", default="servegen/m-large")
    parser.add_argument("--capacity", type=float, default=DEFAULT_CAPACITY_RPS)
    parser.add_argument("--provision-delay", type=float, default=600.0)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/autoscale.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    root = rates_dir()
    if root is None:
        raise SystemExit("no rate data: put shared/data/rates beside the repository or set "
                         "TANDEM_RATES_DIR")
    series = [load(root, n) for n in (args.series or SERIES)]
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}"
          f", Python {platform.python_version()}, torch {torch.__version__}")
    results = run_backtests(series)
    default = choose_default(results)
    print(backtest_table(results, series))
    print(f"\ndefault model by backtest: {default}")

    s = load(root, args.replay_series)
    policy = ReplicaPolicy(capacity_rps=args.capacity, max_replicas=64)
    config = ReplayConfig(provision_delay_s=args.provision_delay)
    rows = {}
    for model in COMPLEXITY:
        reactive, forecast, fc, since = run_replay(s, model, policy, config)
        rows[model] = forecast.summary(since)
        rows["reactive only"] = reactive.summary(since)
        if model == default and not args.no_plot:
            plot(s, reactive, forecast, fc, since, model, policy,
                 HERE / "autoscale_replay.png")
    days = (len(s.values) * s.step_s - since) / 86400
    print(f"\nreplay of {s.name} after the warm-up ({days:.0f} days), capacity "
          f"{policy.capacity_rps:g} req/s per replica, provisioning "
          f"{config.provision_delay_s:.0f} s:")
    print("| scaling | peak queue | minutes with a backlog | queued request-minutes | "
          "replica-hours |\n| --- | --- | --- | --- | --- |")
    for name in ("reactive only", *COMPLEXITY):
        r = rows[name]
        print(f"| {name} | {r['peak_queue']:,.0f} | {r['backlog_minutes']:,.0f} | "
              f"{r['queued_request_minutes']:,.0f} | {r['replica_hours']:,.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backtest": [r.__dict__ for r in results],
                                    "default": default, "replay": rows}, indent=1))


if __name__ == "__main__":
    main()
