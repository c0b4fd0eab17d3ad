#!/usr/bin/env python
"""Ablation of JiT's positional encodings on real images: seeds, metrics, every image size, a results page.

Trains the same JiT once per encoding, seed and training regime (one config, one data order per
seed: only ``model.pos_embed`` differs), evaluates every run with ``jitrope.eval.evaluate`` and writes a
Markdown results page with tables (mean ± spread over seeds), verdicts, plots and the answer, and the
README's answer block. What a study runs is a plan, ``studies/posenc/plans/<name>.yaml`` (``--scale
NAME``, or ``--plan-file PATH``); an option on the command line overrides the plan's value.

Plans: cpu (32x32, every encoding, 300 steps), study (32x32, 4 encodings x 3 seeds x 2000 steps, every
size, single and mixed training), seed-cpu (the problem statement's 64x64 setting, 256 -> 320 tokens,
on a CPU) and seed (the same on one GPU). ``--plan`` prints what a plan runs, the measured step time
of its config (and the command that measured it), the time it takes, and what its runs have trained.

Stages (``--stage``): ``train`` trains (or resumes) every run; ``eval`` evaluates every trained run
that has no evaluation yet (the final one, one per checkpoint for FD-emoji vs step, the every-size
study); ``report`` writes the page from what is there (``--from-json`` rebuilds it from a page's JSON
alone); ``all`` (default) does the three in order. Every stage resumes, across sessions.

    python studies/posenc/run.py --scale seed-cpu --plan               # runs, step time, estimate, progress
    python studies/posenc/run.py --scale seed-cpu --stage train --out-dir runs/seed64
    python studies/posenc/run.py --scale seed-cpu --stage eval --out-dir runs/seed64
    python studies/posenc/run.py --scale seed-cpu --stage report --out-dir runs/seed64 \\
        --report docs/results.md --readme README.md         # the page: 64x64 first, the 32x32 study after it
    python studies/posenc/run.py --stage report --from-json docs/results.json --report docs/results.md
    python studies/posenc/run.py --config configs/tiny_cpu.yaml --steps 2 --seeds 0     # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from tqdm import tqdm  # noqa: E402

from jitrope.config import ConfigError, load_config  # noqa: E402
from jitrope.eval.featnet import load_or_train_featnet  # noqa: E402
from jitrope.posenc import POS_EMBEDS  # noqa: E402
from jitrope.rope import SCALING_MODES  # noqa: E402
from jitrope.runlog import read_metrics  # noqa: E402
from studies.posenc import plan as P  # noqa: E402
from studies.posenc import report as R  # noqa: E402
from studies.posenc import runs  # noqa: E402
from studies.posenc.study import condition_placement  # noqa: E402

STAGES = ("train", "eval", "report", "all")
NUMBERS = ("steps", "jobs", "ckpt_every", "log_every", "n_per_class", "n_cond", "max_images", "sample_steps")
NUMBERS += ("res_n_per_class", "res_max_images", "step_n_per_class")
# Options that set a plan value: key, help. Numbers take int; the others are text read as the plan's key.
OPTIONS = (
    ("config", "training config (YAML)"),
    ("encodings", f"comma-separated model.pos_embed values, or 'all' ({', '.join(POS_EMBEDS)})"),
    ("seeds", "comma-separated train.seed values of the main ablation"),
    ("steps", "training steps per run"),
    ("jobs", "runs at a time (on a CPU: one thread each)"),
    ("device", "cpu | cuda"),
    ("ckpt_every", "checkpoint interval: the points of FD-emoji vs step"),
    ("log_every", "training-loss logging interval (the loss curves)"),
    ("out_dir", "folder of the runs (default runs/ablation_<plan>)"),
    ("n_per_class", "class-conditional samples per class (FD-emoji, class acc)"),
    ("n_cond", "condition-image samples (PSNR/SSIM, FD-emoji with the condition)"),
    ("max_images", "held-out images in the v-loss"),
    ("sample_steps", "Heun sampler steps in the evaluation"),
    ("t_grid", "comma-separated t values of the held-out v-loss"),
    ("step_n_per_class", "samples per class at each checkpoint (FD vs step)"),
    ("step_seeds", "seeds whose runs get FD vs step: comma-separated or 'all'"),
    ("res_px", "square sizes of the every-size study; '' (with --res-hw '') skips it"),
    ("res_hw", "sizes HxW (rows x columns) of the every-size study, e.g. 32x48,48x32"),
    ("res_n_per_class", "samples per class at each size"),
    ("res_max_images", "held-out images of the v-loss at each size"),
    ("res_seeds", "seeds whose runs get the every-size study: comma-separated or 'all'"),
    ("scalings", f"pos_scaling modes of the every-size study ({', '.join(SCALING_MODES)})"),
    ("earlier", "results JSON of an earlier, shorter ablation: its other encodings' rows stay on the page"),
)


# ----------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--scale", choices=P.plan_names(), default=None, help="a plan of studies/posenc/plans")
    which.add_argument("--plan-file", default=None, help="a plan file (YAML) anywhere")
    p.add_argument("--stage", choices=STAGES, default="all", help="train | eval | report | all (default all)")
    p.add_argument(
        "--plan",
        dest="show_plan",
        action="store_true",
        help="print what runs, the step time, the estimate and the progress",
    )
    for key, text in OPTIONS:
        p.add_argument("--" + key.replace("_", "-"), type=int if key in NUMBERS else str, default=None, help=text)
    p.add_argument("--regimes", default=None, help="the plan's training regimes to run, 'single' first (default all)")
    p.add_argument("--report", default=None, help="results page to write (default <out-dir>/results.md)")
    p.add_argument(
        "--readme",
        default=None,
        help="also write the answer into this README, between '<!-- answer: ... -->' and '<!-- /answer -->'",
    )
    p.add_argument("--from-json", default=None, help="with --stage report: rebuild the page from a page's JSON")
    p.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides for every run")
    return p


def _list(v, conv: Callable = str) -> list:
    """A plan's list or a command line's comma-separated text, as a list of ``conv`` values."""
    items = v if isinstance(v, (list, tuple)) else str(v).split(",") if v is not None else []
    return [conv(x.strip() if isinstance(x, str) else x) for x in items if str(x).strip()]


def _hw(s) -> tuple:
    hw = tuple(int(v) for v in str(s).lower().split("x"))
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(s)
    return hw


def _parsed(p, flag: str, v, conv: Callable, wants: str) -> list:
    try:
        return _list(v, conv)
    except ValueError:
        p.error(f"{flag} wants {wants}, got {v!r}")


def _plan_of(p, args) -> None:
    """The plan: --plan-file, --scale, the scale a --from-json page names, else cpu."""
    if args.plan_file is None and args.scale is None and args.from_json is not None and args.stage == "report":
        try:
            study = R.read_page_json(args.from_json).get("study") or {}
        except (OSError, ValueError) as e:
            p.error(f"--from-json {args.from_json}: {e}")
        args.scale = study.get("scale") if study.get("scale") in P.plan_names() else None
        args.out_dir = args.out_dir or study.get("out_dir")
    args.plan_file = str(Path(args.plan_file) if args.plan_file else P.PLANS / f"{args.scale or 'cpu'}.yaml")
    args.plan_name = Path(args.plan_file).stem
    try:
        args.plan = P.load_plan(args.plan_file)
    except P.PlanError as e:
        p.error(str(e))
    for key, _ in OPTIONS:
        if getattr(args, key) is None:
            setattr(args, key, args.plan.get(key))
    args.plan_root = str(ROOT)  # a plan's paths (config, earlier, previous) are the repository's


def _lists(p, args) -> None:
    names = list(POS_EMBEDS) if args.encodings == "all" else _list(args.encodings)
    bad = [e for e in names if e not in POS_EMBEDS]
    if bad or not names:
        p.error(f"--encodings: unknown {bad}; choose from {list(POS_EMBEDS)}" if bad else "--encodings: none given")
    args.names = names
    args.seed_list = _parsed(p, "--seeds", args.seeds, int, "comma-separated integers")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds: give distinct integers, got {args.seeds!r}")
    args.res_list = _parsed(p, "--res-px", args.res_px, int, "comma-separated integers")
    args.hw_list = _parsed(p, "--res-hw", args.res_hw, _hw, "comma-separated sizes HxW (e.g. 32x48,48x32)")
    args.t_list = _parsed(p, "--t-grid", args.t_grid, float, "comma-separated numbers")
    for k in ("res_seeds", "step_seeds"):
        flag, v = "--" + k.replace("_", "-"), getattr(args, k)
        chosen = list(args.seed_list) if v == "all" else _parsed(p, flag, v, int, "'all' or comma-separated integers")
        outside = [s for s in chosen if s not in args.seed_list]  # a seed without a main run would get no study
        if outside:
            p.error(f"{flag}: {outside} not among --seeds {args.seed_list}")
        setattr(args, k + "_list", chosen)
    args.scaling_list = _list(args.scalings)
    if not args.scaling_list or any(s not in SCALING_MODES for s in args.scaling_list):
        p.error(f"--scalings: comma-separated modes of {list(SCALING_MODES)}, got {args.scalings!r}")


def _regimes(p, args) -> None:
    args.regime_defs = dict(args.plan.get("regimes") or {"single": {}})
    args.regime_list = _list(args.regimes) if args.regimes is not None else list(args.regime_defs)
    if (
        not args.regime_list
        or any(g not in args.regime_defs for g in args.regime_list)
        or args.regime_list[0] != "single"
    ):
        p.error(
            f"--regimes: comma-separated names of the plan's regimes {list(args.regime_defs)}, 'single' first "
            f"(the main ablation's runs), got {args.regimes!r}"
        )


def _checks(p, args) -> None:
    for name in NUMBERS:
        if getattr(args, name) is None or getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for o in args.overrides:
        if "=" not in o:
            p.error(f"override {o!r} is not dotted.key=value")
        if o.split("=", 1)[0] in ("model.pos_embed", "train.out_dir", "train.steps", "train.seed"):
            p.error(f"override {o!r}: the ablation sets {o.split('=', 1)[0]} itself")
    if args.from_json is not None and args.stage != "report":
        p.error("--from-json writes a page from a results JSON: use it with --stage report")
    if args.readme is not None:
        try:
            R.split_readme(Path(args.readme).read_text(), args.readme)
        except (OSError, ValueError):
            p.error(f"--readme {args.readme}: not a file with the lines {R.README_BEGIN!r} and {R.README_END!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    _plan_of(p, args)
    _lists(p, args)
    _regimes(p, args)
    _checks(p, args)
    args.config = str(Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config)
    args.out_dir = args.out_dir or f"runs/ablation_{args.plan_name}"
    args.argv = argv
    return args


# ----------------------------------------------------------------------------------- the page
def _shown(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(path)


def runs_command(args) -> str:
    """The command that trains and evaluates the runs: this one without its report options."""
    drop, out, i = ("--stage", "--report", "--readme", "--from-json"), [], 0
    while i < len(args.argv):
        a = args.argv[i]
        i += 1
        if a.split("=", 1)[0] in drop:
            i += "=" not in a  # its value too
        else:
            out.append(a)
    if not any(a.split("=", 1)[0] == "--out-dir" for a in out):
        out += ["--out-dir", str(args.out_dir)]
    return " ".join(["python studies/posenc/run.py", *out])


def page_info(args, rows: Sequence[Mapping[str, Any]]) -> R.PageInfo:
    cfg = load_config(args.config, list(args.overrides))
    mc = cfg.model_config()
    enc = {g: (d.get("encoding_overrides") or {}) for g, d in args.regime_defs.items() if g in args.regime_list}
    earlier = args.earlier
    steps = sorted({r["step"] for r in R.json_runs(earlier)}) if earlier else []
    seeds = {r["seed"] for r in R.json_runs(earlier)} if earlier else set()
    return R.PageInfo(
        plan=args.plan_name,
        config=_shown(args.config),
        img_size=mc.img_size,
        patch_size=mc.patch_size,
        cond_img_size=mc.cond_img_size,
        null_cond=mc.null_cond,
        width=mc.hidden_size,
        depth=mc.depth,
        heads=mc.num_heads,
        in_context=mc.in_context_len,
        steps=args.steps,
        batch=cfg.train.batch_size,
        lr=cfg.train.lr,
        names=list(args.names),
        n_per_class=args.n_per_class,
        sample_steps=args.sample_steps,
        step_n_per_class=args.step_n_per_class,
        res_n_per_class=args.res_n_per_class,
        machine=runs.machine(),
        device=args.device,
        jobs=args.jobs,
        out_dir=str(args.out_dir),
        runs_command=runs_command(args),
        regimes={g: P.regime_about(args.regime_defs[g], cfg) for g in args.regime_list},
        regime_notes={
            g: ", ".join(f"`{n}` trains it with {' '.join(o)}" for n, o in e.items()) for g, e in enc.items() if e
        },
        trained_sizes={
            g: [(s, s) for s in P.regime_sizes(args.regime_defs[g], mc.img_size, mc.patch_size)]
            for g in args.regime_list
        },
        study_sizes=[(s, s) for s in args.res_list] + list(args.hw_list),
        step_time=P.step_time(args),
        placement=condition_placement(mc, args.names) if mc.cond_img_size else {},
        setting_runs={
            k: f"python studies/posenc/run.py --scale {v}" for k, v in (args.plan.get("setting_plans") or {}).items()
        },
        earlier=earlier,
        earlier_label=f"{'/'.join(map(str, steps))} steps, {len(seeds)} seeds" if earlier else "",
        previous=args.plan.get("previous"),
    )


def section_of_records(path, plan: Optional[str] = None) -> List[R.Section]:
    """The sections of a page's JSON (those of ``plan`` only, if given). The one-study JSON of older pages
    becomes one section, described by the plan it names (its scale) and the run folder it names."""
    d = R.read_page_json(path)
    if "sections" in d:
        return [R.Section.from_json(s) for s in d["sections"] if plan is None or s["plan"] == plan]
    study = d.get("study") or {}
    if plan is not None and study.get("scale") != plan:
        return []
    args = parse_args(["--scale", study.get("scale") or "cpu", "--out-dir", study.get("out_dir") or "runs"])
    return [R.Section(page_info(args, d["runs"]), d["runs"], d["fd_sanity"], d.get("timing") or {})]


def also_shown(args) -> List[R.Section]:
    """The sections a plan shows below its own (``also_show``), from the records their page kept."""
    out = []
    for item in args.plan.get("also_show") or []:
        found = section_of_records(ROOT / item["records"], item["plan"])
        if not found:
            raise RuntimeError(f"{item['records']} holds no records of the {item['plan']} study (plan also_show)")
        out += found
    return out


def report(args) -> Path:
    out = Path(args.report) if args.report else Path(args.out_dir) / "results.md"
    command = "python studies/posenc/run.py " + " ".join(args.argv)
    if args.from_json:
        sections = section_of_records(args.from_json)
    else:
        rows = runs.collect(args)
        if not any(r.get("regime", "single") == "single" and "vloss" in r for r in rows):
            raise RuntimeError("no evaluated run to report; run --stage train and --stage eval first")
        # Times come from the runs' own records (training: metrics.jsonl; evaluation: each record's
        # seconds), so calls made side by side or in other sessions all count.
        timing = dict(zip(("eval", "eval_count"), runs.eval_seconds(args)))
        sections = [R.Section(page_info(args, rows), rows, runs.fd_sanity(args), timing)] + also_shown(args)
    page = R.write_page(sections, out, command=command)
    if args.readme:
        readme = Path(args.readme)
        link = Path(os.path.relpath(page.resolve(), readme.resolve().parent)).as_posix()
        R.write_readme_answer(readme, R.readme_answer(sections, link, command))
    return page


# ----------------------------------------------------------------------------------- main
def print_plan(args, jobs) -> None:
    for line in P.plan_lines(args):
        print(line)
    recs = [read_metrics(d) if (d / "metrics.jsonl").exists() else [] for d in (runs.run_dir(args, *j) for j in jobs)]
    print(P.progress_line(args.out_dir, recs, args.steps, args.jobs))


def run_stage(args, stage: str, jobs, failures: List[str]) -> None:
    """Every job of a stage, ``args.jobs`` at a time; failures are collected, the rest goes on."""
    fns = [runs.train_one] if stage == "train" else [runs.eval_final, runs.eval_steps, runs.eval_sizes]
    if stage == "eval":  # the feature network once, here, before parallel evaluations would race for it
        load_or_train_featnet(load_config(args.config, list(args.overrides)).data, device=args.device)
    bar = tqdm(total=len(jobs) * len(fns), desc=stage, unit="job")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(fn, args, n, s, g): (fn.__name__, n, s, g) for fn in fns for n, s, g in jobs}
        for fut in as_completed(futures):
            what, n, s, g = futures[fut]
            try:
                spent = fut.result()
                if spent:
                    bar.write(f"{what} {n} seed {s} ({g}): {spent / 60:.1f} min")
            except RuntimeError as e:
                failures.append(str(e))
                bar.write(str(e))
            bar.update(1)
    bar.close()


def _report_and_say(args) -> int:
    try:
        out = report(args)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if args.from_json else 1
    print(f"wrote {out} (and {out.with_suffix('.json').name}, {out.stem}_*.png beside it)")
    if args.readme:
        print(f"wrote the answer into {args.readme}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not Path(args.config).exists():
        print(f"error: --config {args.config} does not exist", file=sys.stderr)
        return 2
    jobs = runs.regime_runs(args)
    if args.show_plan:
        print_plan(args, jobs)
        return 0
    if args.from_json is not None:  # a page from a results JSON alone: no run folder is touched
        return _report_and_say(args)
    try:
        runs.check_regimes(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failures: List[str] = []
    t_all = time.perf_counter()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    print(
        f"ablation ({args.plan_name}): {len(args.names)} encodings x seeds {args.seed_list} x {args.steps} steps, "
        f"regimes {args.regime_list}, {args.jobs} at a time on {args.device}, runs in {args.out_dir}",
        flush=True,
    )
    # The main evaluations come before FD vs step and the every-size study, so a cut-short one still has tables.
    for stage in ("train", "eval"):
        if args.stage in (stage, "all") and not failures:
            run_stage(args, stage, jobs, failures)
    rc = 1 if failures else 0
    if args.stage in ("report", "all") and not failures:
        rc = _report_and_say(args)
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    print(f"wall time {(time.perf_counter() - t_all) / 60:.1f} min")
    return rc


if __name__ == "__main__":
    sys.exit(main())
