"""The `upstack` command: run, status, show, report and push a recipe, import a mergekit config. Heavy imports wait until needed."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from upstack.core.errors import UserError


def _recipe_arguments(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    cmd.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    cmd.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. stages.sft.trainer.learning_rate=1e-5",
    )
    return cmd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upstack",
        description="Depth up-scaling and its post-training stack (SOLAR-style), one recipe at a time.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help: str) -> argparse.ArgumentParser:
        return _recipe_arguments(sub.add_parser(name, help=help, description=help))

    run = recipe_command("run", "run stages (and whatever they need that is missing or stale)")
    run.add_argument("targets", nargs="*", help="stage names or kinds; default: every stage")
    run.add_argument("--force", action="store_true", help="rerun the targets even if up to date")
    run.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    run.add_argument(
        "--no-fit-check",
        action="store_true",
        help="run a training stage even when its planned memory per GPU exceeds the GPUs'",
    )

    recipe_command("status", "table of stages: done, stale, missing or failed, with metrics")
    from upstack.commands import plan as plan_command

    plan_command.add_arguments(
        recipe_command(
            "plan",
            "before anything runs: per stage, parameters, memory per GPU by component and "
            "whether it fits, tokens, time, GPU-hours and cost on the GPUs given",
        )
    )
    show = recipe_command(
        "show", "print the fully resolved recipe (defaults and overrides applied)"
    )
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")

    report = recipe_command(
        "report", "eval tables of the finished eval stages; writes <output_dir>/report.md"
    )
    report.add_argument(
        "--summary",
        action="store_true",
        help="print only each stage's effect in one line, the best model and where the files are",
    )
    layers = recipe_command(
        "layers",
        "the layer map of upscale stages: each layer's source, copy and role (original, "
        "duplicate, seam, new), and which layers the training stages below them train",
    )
    layers.add_argument(
        "stage",
        nargs="?",
        help="an upscale stage, or a stage whose model comes from one; default: every upscale stage",
    )
    push = recipe_command(
        "push", "upload a finished stage (model, or synth/pairs data) with a card"
    )
    push.add_argument("stage", help="the stage to push")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="repository on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument(
        "--license", help="license for the card (default: the base model's, if known)"
    )
    push.add_argument(
        "--dry-run", action="store_true", help="list the files, print the card, send nothing"
    )

    mixture = sub.add_parser(
        "mixture", help="data mixtures (BiMix)", description="data mixtures (BiMix)"
    )
    mixture_commands = mixture.add_subparsers(dest="mixture_command", required=True)
    fit = _recipe_arguments(
        mixture_commands.add_parser(
            "fit",
            help="fit the mixing law to finished cpt proxy runs; print the best shares",
            description="fit BiMix's L(s, r) = (A/s^alpha + C)(B/r^beta) per source to the "
            "held-out curves of cpt stages run with different `mixture.weights`",
        )
    )
    fit.add_argument("stages", nargs="+", help="finished cpt stages with `mixture:`")
    fit.add_argument("--steps", type=int, help="step budget to choose shares for")
    imported = sub.add_parser(
        "import-merge",
        help="a mergekit YAML (from a model card) as a merge stage, comments kept",
        description="Print a mergekit YAML as a recipe's merge stage, or add it to a recipe "
        "(--into): its lines and comments as they are, checked as the recipe loads; a "
        "mergekit-multi file becomes a stage per document. Replace its model names by stage "
        "names afterwards, wherever a model goes: those that name nothing here are listed.",
    )
    imported.add_argument("config", help="the mergekit YAML, e.g. saved from a model card")
    imported.add_argument(
        "--stage",
        help="the stage's name (default: merge); in a mergekit-multi file, the final merge's "
        "(default: its name:)",
    )
    imported.add_argument(
        "--into", metavar="RECIPE", help="add the stage at the end of this recipe's stages"
    )
    return parser


def _worker_parser() -> argparse.ArgumentParser:
    """`upstack _stage`: one stage in this process, what each `accelerate launch` worker runs.
    A parser of its own, so that `upstack --help` does not list it."""
    stage = _recipe_arguments(argparse.ArgumentParser(prog="upstack _stage"))
    stage.add_argument("stage")
    stage.add_argument("--out-dir", required=True)
    stage.add_argument("--work-dir", required=True)
    return stage


def main(argv: list[str] | None = None) -> int:
    from upstack.core import logs
    from upstack.core.cpu import configure_process

    configure_process()  # before torch is imported by anything below
    logs.capture()  # libraries' warnings go to the stage's log, not between upstack's lines
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stage"]:
        args = _worker_parser().parse_args(argv[1:])
        args.command = "_stage"
    else:
        args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside a stage (a stage's becomes its Interrupted line)
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "import-merge":
        return _import_merge(args)
    if args.command == "plan":
        from upstack.commands import plan

        plan.run(args)
        return 0
    from upstack.core import runner
    from upstack.core.recipe import load_recipe
    from upstack.core.tables import markdown_table

    if args.command == "run" and not args.dry_run:
        # refused at once, before the seconds of imports that loading the recipe takes
        runner.refuse_if_locked(args.recipe, args.overrides)
    # status, report and layers only read state: skip the checks that import mergekit and torch
    recipe = load_recipe(
        args.recipe, args.overrides, deep=args.command not in ("status", "report", "layers")
    )
    if args.command == "run":
        runner.run(
            recipe,
            args.targets,
            force=args.force,
            dry_run=args.dry_run,
            fit_check=not args.no_fit_check,
        )
        if not args.dry_run and runner.nodes(recipe)["machine_rank"] == 0:
            print(markdown_table(runner.STATUS_HEADERS, runner.status_rows(recipe)))
    elif args.command == "status":
        print(markdown_table(runner.STATUS_HEADERS, runner.status_rows(recipe)))
    elif args.command == "show":
        _show(recipe, args.json)
    elif args.command == "report":
        from upstack.commands.report import for_terminal, report, summary

        text = report(recipe)  # report.md is written either way
        print(summary(recipe) if args.summary else for_terminal(text, recipe.out_dir), end="")
    elif args.command == "layers":
        from upstack.commands.report import layers_report

        print(layers_report(recipe, args.stage), end="")
    elif args.command == "push":
        _push(recipe, args)
    elif args.command == "mixture":
        _mixture_fit(recipe, args)
    elif args.command == "_stage":
        _run_worker(recipe, args)
    return 0


def _show(recipe, as_json: bool) -> None:
    """The resolved recipe; then, for each stage that passes settings to a library (the training
    stages: TRL), every setting it gets on this machine: upstack's defaults and the stage's,
    under the recipe's values."""
    from upstack.core import registry
    from upstack.core.errors import redact

    data = redact(recipe.to_dict())
    effective = {}
    for name, spec in recipe.stages.items():
        settings = registry.kind(spec.kind).effective_settings(spec)
        if settings is not None:
            effective[name] = redact(settings)
    if as_json:
        print(json.dumps({**data, "effective_trainer": effective}, indent=2))
        return
    print(yaml.safe_dump(data, sort_keys=False), end="")
    if effective:
        from upstack.train.settings import on_gpu

        device = "GPU" if on_gpu() else "CPU"
        print(
            f"---\n# What each training stage passes to TRL on this machine ({device}): upstack's "
            "defaults, then the stage's,\n# then the recipe's `trainer:` (output_dir and seed "
            "are the stage's; sft adds its loss mask).\n"
            + yaml.safe_dump({"effective_trainer": effective}, sort_keys=False),
            end="",
        )


def _mixture_fit(recipe, args: argparse.Namespace) -> None:
    """`upstack mixture fit`: laws per source, the shares they predict best; JSON and PNG."""
    from upstack.core.tables import markdown_table
    from upstack.train.mixture import fit_stages, plot_fit

    result = fit_stages(recipe, args.stages, args.steps)
    run_dir = recipe.run_dir
    plot = run_dir.internal / "mixture-fit.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_fit(result, plot)
    written, written_plot = run_dir.write_files(
        {
            "mixture-fit.json": (json.dumps(result, indent=2) + "\n").encode(),
            "mixture-fit.png": plot.read_bytes(),
        }
    )
    plot.unlink()
    rows = [
        [
            name,
            law["alpha"],
            law["beta"],
            law["K"],
            law["M"],
            law["rmse"],
            result["best_shares"][name],
            result["predicted_loss"][name],
        ]
        for name, law in result["laws"].items()
    ]
    headers = ["source", "alpha", "beta", "K=A*B", "M=C*B", "rmse(log)", "best share", "loss"]
    print(f"L(s, r) = (K / s^alpha + M) / r^beta, best shares for {result['steps']} steps:")
    print(markdown_table(headers, rows))
    print(f"wrote {written} and {written_plot}")


def _import_merge(args: argparse.Namespace) -> int:
    from upstack.commands.import_merge import import_merge

    imported = import_merge(args.config, stage=args.stage, into=args.into)
    for note in imported.notes:  # names changed, names to replace
        print(note, file=sys.stderr)
    if args.into:
        stages = "stage" if len(imported.stages) == 1 else "stages"
        print(f"added {stages} {', '.join(imported.stages)} to {args.into}", file=sys.stderr)
    else:
        print(imported.block, end="")
    return 0


def _push(recipe, args: argparse.Namespace) -> None:
    """`upstack push RECIPE STAGE --repo-id ORG/NAME`: one finished stage, outside any run."""
    from upstack.stages.push import push_stage

    result = push_stage(
        recipe,
        args.stage,
        args.repo_id,
        private=args.private,
        license=args.license,
        dry_run=args.dry_run,
        log=lambda message: print(message, file=sys.stderr),
    )
    if not args.dry_run:
        print(f"pushed {len(result['files'])} files to {result['url']}")


def _run_worker(recipe, args: argparse.Namespace) -> None:
    from pathlib import Path

    from upstack.core import logs, registry, runner, signals
    from upstack.core.context import is_main_process
    from upstack.core.rundir import WORKER_ERROR, WORKER_METRICS

    logs.to_stage_log(Path(args.work_dir))  # each rank's library records, in the stage's log
    if registry.kind(recipe.stages[args.stage].kind).launchable:
        from upstack.train.distributed import fsdp_on_cpu

        fsdp_on_cpu()  # an FSDP config means FSDP on CPU too, not DDP
    hashes = runner.stage_hashes(recipe)
    try:
        with signals.handling(recipe.launch.grace_seconds):
            metrics = runner.execute_stage(
                recipe, args.stage, Path(args.out_dir), Path(args.work_dir), hashes[args.stage]
            )
    except UserError as err:
        if is_main_process():  # the launcher prints it as the stage's one line
            error = {"message": str(err), "exit_code": err.exit_code}
            (Path(args.out_dir) / WORKER_ERROR).write_text(json.dumps(error))
        raise
    if is_main_process():
        (Path(args.out_dir) / WORKER_METRICS).write_text(json.dumps(metrics, default=str))


if __name__ == "__main__":
    sys.exit(main())
