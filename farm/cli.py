"""`farm run | validate | up | submit | status | cancel | workers | down | report | lora inspect`: argument parsing only.

Exit codes: 0 every job succeeded (or nothing left to do), 1 some job failed,
2 a bad manifest (nothing rendered), 130 interrupted (finished results kept).
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from jobs.options import LORA_MODES

    p = argparse.ArgumentParser(prog="farm", description="A Ray render farm for diffusion models with many LoRAs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a manifest on an embedded local Ray cluster or --address")
    run.add_argument("manifest")
    run.add_argument("--out", help="output root (fsspec URL or dir); default: the manifest's `output`")
    run.add_argument("--workers", type=int, help="workers (default: GPUs found, else 1 with a logical GPU)")
    run.add_argument("--address", help="join an existing Ray cluster (e.g. auto or 127.0.0.1:6379)")
    run.add_argument("--lora-mode", choices=LORA_MODES)
    run.add_argument("--max-batch", type=int)
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                     help="also allow local LoRA files under DIR (repeatable; the manifest's dir always is)")
    val = sub.add_parser("validate", help="check a manifest; exit 2 listing every problem")
    val.add_argument("manifest")
    val.add_argument("--deep", action="store_true",
                     help="also fetch every LoRA (node cache), check checksums and headers, and bind each to the "
                          "model built on the meta device (no weights loaded, nothing rendered)")
    lora = sub.add_parser("lora", help="LoRA file tools").add_subparsers(dest="lora_cmd", required=True)
    ins = lora.add_parser("inspect", help="layout, ranks, alphas, dtypes, size and targets of a LoRA file")
    ins.add_argument("file")
    ins.add_argument("--model", metavar="SPEC",
                     help='also bind to a model: a backend name (tiny) or a manifest model as JSON, '
                          'e.g. \'{"backend": "diffusers", "path": DIR}\'')
    ins.add_argument("--json", action="store_true", help="print the result as JSON")
    sm = sub.add_parser("submit", help="hand a manifest to the running farm (or, with an http:// --address and no "
                                       "farm, run it as a one-shot Ray job through the Jobs API)")
    sm.add_argument("manifest")
    sm.add_argument("--address", help="the farm's cluster (GCS host:port), or a head's dashboard http://HEAD:8265 for "
                                      "the one-shot Jobs API path; default: the farm `farm up` started here")
    sm.add_argument("--out", help="output root (fsspec URL or dir); default: the manifest's `output`")
    sm.add_argument("--workers", type=int, help="one-shot Jobs API path only")
    sm.add_argument("--submitter", help="whose run this is (fair share); default $USER")
    sm.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    sm.add_argument("--wait", action="store_true", help="follow the run until it ends; exit like `farm run`")
    sm.add_argument("--no-progress", action="store_true")
    sm.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)  # inside a Jobs API job: farm or one-shot
    st = sub.add_parser("status", help="runs of the farm (or one run); with an http:// --address, a Ray job's status")
    st.add_argument("run_id", nargs="?")
    st.add_argument("--address")
    st.add_argument("--json", action="store_true")
    up = sub.add_parser("up", help="start (or reconcile) the farm from FARM.yaml; returns when its workers are ready")
    up.add_argument("--config", required=True)
    up.add_argument("--address", help="a running Ray cluster (host:port or auto); default: start a local one on loopback")
    dn = sub.add_parser("down", help="stop the farm: drain (in-flight jobs finish) or --now")
    dn.add_argument("--address")
    dn.add_argument("--now", action="store_true")
    cn = sub.add_parser("cancel", help="cancel a run: queued jobs dropped, in-flight ones finish")
    cn.add_argument("run_id")
    cn.add_argument("--address")
    wk = sub.add_parser("workers", help="each worker: node, pool, held composition, adapters, jobs done, loads")
    wk.add_argument("--address")
    wk.add_argument("--json", action="store_true")
    rep = sub.add_parser("report", help="write DIR/report.html, a gallery: a table per prompt, a column per composition")
    rep.add_argument("dir")
    return p


def _load(path: str):
    from .loading import load_or_report

    return load_or_report(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "validate":
        m = _load(args.manifest)
        if m is None:
            return 2
        if args.deep:
            from .deep_validate import deep_problems

            problems, notes = deep_problems(m)
            for note in notes:
                print(f"{args.manifest}: note: {note}", file=sys.stderr)
            if problems:
                print(f"{args.manifest}: {len(problems)} LoRA problem(s):", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                return 2
        print(f"{args.manifest}: ok, {len(m.jobs)} job(s), {len({j.routing_key for j in m.jobs})} composition(s)")
        return 0
    if args.cmd == "run":
        from storage.policy import roots_in_env

        with roots_in_env(args.lora_root):  # validation sees --lora-root as the workers will
            m = _load(args.manifest)
        if m is None:
            return 2
        from .runner import run_manifest

        summary = run_manifest(m, out=args.out, workers=args.workers, address=args.address,
                               lora_mode=args.lora_mode, max_batch=args.max_batch, progress=not args.no_progress,
                               lora_roots=args.lora_root)
        print(summary.describe())
        return summary.exit_code
    if args.cmd == "lora":
        return _lora_inspect(args)
    if args.cmd in ("submit", "status") and (args.address or "").startswith(("http://", "https://")):
        return _jobs_api(args)
    if args.cmd == "submit" and args.in_job:
        return _in_job(args)
    if args.cmd in ("up", "submit", "status", "cancel", "workers", "down"):
        return _service(args)
    if args.cmd == "report":
        from .report import write_report

        print(write_report(args.dir))
        return 0
    return 2


def _lora_inspect(args: argparse.Namespace) -> int:
    """Exit 0: the file reads (and, with --model, every target binds); 2 otherwise."""
    import json

    from lora_core.errors import LoraError
    from lora_core.inspection import format_summary

    from .deep_validate import inspect_file, parse_model_spec

    try:
        model = parse_model_spec(args.model) if args.model else None
        info, binding = inspect_file(args.file, model)
    except (LoraError, ValueError, OSError) as e:
        print(f"farm lora inspect: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**info, **({"binding": binding} if binding is not None else {})}, indent=1))
    else:
        print(format_summary(info, binding))
    return 2 if binding is not None and binding["refused"] else 0


def _service(args: argparse.Namespace) -> int:
    import contextlib

    from .service import client

    client.stdout = sys.stdout  # the command's results; anything else printed meanwhile (Ray's notices) -> stderr
    with contextlib.redirect_stdout(sys.stderr):
        return _service_command(args, client)


def _service_command(args: argparse.Namespace, client) -> int:
    try:
        if args.cmd == "up":
            return client.up(args.config, args.address)
        if args.cmd == "submit":
            return client.submit(args.manifest, args.address, submitter=args.submitter, priority=args.priority,
                                 wait=args.wait, progress=not args.no_progress, out=args.out)
        if args.cmd == "status":
            return client.status(args.run_id, args.address, args.json)
        if args.cmd == "cancel":
            return client.cancel(args.run_id, args.address)
        if args.cmd == "workers":
            return client.workers(args.address, args.json)
        return client.down(args.address, args.now)
    except client.FarmUnavailable as e:
        print(f"farm {args.cmd}: {e}", file=sys.stderr)
        return 1


def _in_job(args: argparse.Namespace) -> int:
    """`farm submit` as a Jobs API job runs it on the cluster: to the farm when one is up, else one-shot."""
    from .service import client
    from .submit import ONE_SHOT_MARK, RUN_MARK

    if client.farm_is_up("auto"):
        client.mark = RUN_MARK
        args.address = "auto"  # the job's own cluster
        return _service(args)
    print(ONE_SHOT_MARK, flush=True)
    m = _load(args.manifest)
    if m is None:
        return 2
    from .runner import run_manifest

    summary = run_manifest(m, workers=args.workers, address="auto", progress=False)
    print(summary.describe())
    return summary.exit_code


def _jobs_api(args: argparse.Namespace) -> int:
    from .submit import SubmitError, status, submit

    try:
        if args.cmd == "status":
            if not args.run_id:
                print("farm status: a Ray job id is needed with an http:// --address", file=sys.stderr)
                return 2
            return status(args.run_id, args.address)
        m = _load(args.manifest)
        if m is None:
            return 2
        return submit(m, args.address, out=args.out, workers=args.workers, wait=args.wait, submitter=args.submitter,
                      priority=args.priority)
    except SubmitError as e:  # refused or unreachable: one line that says what to do, no traceback
        print(f"farm {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
