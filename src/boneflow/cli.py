"""The ``boneflow`` command: parse flags, load Settings, call one function.

Heavy modules (torch, pynetdicom, celery) are imported inside each command so that
``boneflow --help`` and configuration errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from boneflow import __version__
from boneflow.config import Destination, Settings, load_settings, parse_node
from boneflow.errors import BoneflowError, ConfigError
from boneflow.logs import configure_logging
from boneflow.training.options import EvaluateOptions, TrainOptions

Handler = Callable[[Settings, argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings(_flags(args), os.environ, args.config)
    except ConfigError as exc:
        print(f"boneflow: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        handler: Handler = args.handler
        return handler(settings, args)
    except KeyboardInterrupt:
        return 130
    except BoneflowError as exc:
        print(f"boneflow: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (also used to document them)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("configuration (flag > BONEFLOW_* env > TOML file)")
    group.add_argument("--config", type=Path, help="TOML file with BONEFLOW_* keys")
    group.add_argument("--data-dir", dest="data_dir", help="spool, outbox, models, SQLite")
    group.add_argument("--database-url", dest="database_url", help="SQLAlchemy URL")
    group.add_argument("--broker-url", dest="broker_url", help="Celery broker URL")
    group.add_argument("--model-dir", dest="model_dir", help="the model registry")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ERROR")
    group.add_argument(
        "--log-json", dest="log_json", action="store_const", const=True, help="JSON log lines"
    )

    node = argparse.ArgumentParser(add_help=False)
    ngroup = node.add_argument_group("DICOM node")
    ngroup.add_argument("--ae-title", dest="ae_title", help="our AE title")
    ngroup.add_argument("--host", help="address the listener binds")
    ngroup.add_argument("--port", help="port the listener binds")
    ngroup.add_argument("--settle-seconds", dest="settle_seconds", help="study settle time")
    ngroup.add_argument("--destinations", help="comma-separated AET@HOST:PORT or URLs")
    ngroup.add_argument("--metrics-port", dest="metrics_port", help="Prometheus /metrics port")

    parser = argparse.ArgumentParser(
        prog="boneflow",
        description="A DICOM node that gives a fracture second opinion on radiographs. "
        "Not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"boneflow {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str, handler: Handler, help_text: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common, *parents]
        )
        p.set_defaults(handler=handler)
        return p

    command("serve", _serve, "listener + workers on one machine, embedded defaults", node)
    command("listen", _listen, "the DICOM listener alone; jobs go to BONEFLOW_BROKER_URL", node)
    p = command("worker", _worker, "a Celery worker (GPU when present)", node)
    p.add_argument("--queues", default="analysis,dispatch", help="comma-separated queues")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes")

    p = command("demo", _demo, "the whole round trip on this machine, nothing configured", node)
    p.add_argument("--out", type=Path, default=Path("boneflow-demo"), help="result folder")
    p.add_argument(
        "--keep-open", action="store_true", help="keep Orthanc and the node up until Ctrl-C"
    )

    p = command("analyze", _analyze, "analyse local DICOM files without any network")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--out", type=Path, help="write the SR, SCs and heat-map PNGs here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("send", _send, "C-STORE files or folders to any node")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--to", required=True, help="AET@HOST:PORT")
    p.add_argument("--calling-ae-title", default=None, help="our AE title (default AE_TITLE)")

    p = command("echo", _echo, "C-ECHO a node")
    p.add_argument("node", metavar="AET@HOST:PORT")
    p.add_argument("--calling-ae-title", default=None, help="our AE title (default AE_TITLE)")

    p = command("synth", _synth, "write a synthetic radiograph data set with labels")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--count", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument("--format", choices=["png", "dicom"], default="png", dest="fmt")
    p.add_argument("--size", type=int, default=512, help="long side of the images, pixels")
    p.add_argument("--fracture-rate", type=float, default=0.5, help="share of fractured images")
    p.add_argument("--parts", default=None, help="comma-separated body parts (default all)")

    p = command("train", _train, "train body-part and fracture models; report; register")
    _add_data_arguments(p)
    p.add_argument("--task", choices=["router", "fracture", "all"], default="all")
    p.add_argument("--arch", dest="architecture", default=None, help="network architecture")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=None, dest="learning_rate")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--loss", choices=["focal", "weighted-ce"], default="focal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--demo", action="store_true", help="small demo models on synthetic data")
    p.add_argument("--model-version", dest="model_version", default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument(
        "--crop",
        type=int,
        default=0,
        dest="crop_size",
        help="train the fracture model on crops of this size around the fracture lines the "
        "data locate (synth data; a fully-convolutional network such as fracnet)",
    )
    p.add_argument(
        "--localisation-weight",
        type=float,
        default=None,
        help="weight of the fracture-location loss (default 1.0 when the data locate "
        "fractures, as synth data do; 0 turns it off)",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="the fracture model scores each image together with its left-right mirror image "
        "(validation, test and inference; fracnet; twice the fracture model's inference time)",
    )
    p.add_argument(
        "--rotation",
        type=float,
        default=0.0,
        metavar="DEG",
        help="the fracture model also scores each image turned by +DEG and -DEG degrees and "
        "averages the three scores (validation, test and inference; fracnet; 3x the "
        "fracture model's inference time; at most 45; default 0: off)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=0,
        metavar="PX",
        help="the fracture model scores each image in overlapping tiles of PX pixels, each "
        "part of the image from a tile that keeps --tile-margin pixels of context around it "
        "(validation, test and inference; fracnet; 320 for 512 px images: 1.6x the "
        "inference time; default 0: the whole image at once)",
    )
    p.add_argument(
        "--tile-margin",
        type=int,
        default=64,
        metavar="PX",
        help="context kept around each scored part of a tile (default 64: half of a 128 px "
        "training crop)",
    )

    p = command("evaluate", _evaluate, "evaluate a registered model; write a report")
    _add_data_arguments(p)
    p.add_argument("model", help="registered model name")
    p.add_argument("--model-version", dest="model_version", default=None)
    p.add_argument("--split", default="test", help="train, val or test")
    p.add_argument("--batch-size", type=int, default=32)

    p = command("models", _models, "list the registered models")
    p.add_argument("--json", action="store_true")

    p = command("audit", _audit, "the audit trail")
    p.add_argument("--study", help="StudyInstanceUID")
    p.add_argument("--patient", help="PatientID")
    p.add_argument("--status", help="e.g. stored, refused, failed, sent")
    p.add_argument("--since", type=datetime.fromisoformat, help="ISO time")
    p.add_argument("--until", type=datetime.fromisoformat, help="ISO time")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="check the hash chain")

    p = command("status", _status, "queues, workers, in-flight and failed jobs, outbox")
    p.add_argument("--json", action="store_true")

    p = command("db", _db, "database maintenance")
    p.add_argument("action", choices=["upgrade"], help="upgrade: apply schema migrations")
    return parser


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None, help="data set root (or labels.csv)")
    p.add_argument(
        "--format",
        dest="dataset_format",
        choices=["synth", "mura", "fracatlas", "folders", "dicom-csv"],
        default="synth",
    )
    p.add_argument("--report", type=Path, dest="report_dir", default=None, help="report folder")


def _flags(args: argparse.Namespace) -> dict[str, object]:
    keys = (
        "data_dir",
        "database_url",
        "broker_url",
        "model_dir",
        "device",
        "log_level",
        "log_json",
        "ae_title",
        "host",
        "port",
        "settle_seconds",
        "destinations",
        "metrics_port",
    )
    return {key: getattr(args, key, None) for key in keys}


# ---- command handlers: each calls one function ---------------------------------------


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.worker.service import serve

    return serve(settings)


def _listen(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.worker.service import listen

    return listen(settings)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.worker.service import run_worker

    queues = [q.strip() for q in str(args.queues).split(",") if q.strip()]
    return run_worker(settings, queues=queues, concurrency=int(args.concurrency))


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.demo import run_demo

    return run_demo(settings, out_dir=args.out, keep_open=args.keep_open)


def _analyze(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.worker.analyze import analyze_files

    return analyze_files(settings, paths=args.paths, out_dir=args.out, as_json=args.json)


def _send(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.dicom.send import send_command

    destination = _node(args.to, "--to")
    return send_command(
        settings, paths=args.paths, destination=destination, calling_ae_title=args.calling_ae_title
    )


def _echo(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.dicom.send import echo_command

    return echo_command(
        settings, destination=_node(args.node, "node"), calling_ae_title=args.calling_ae_title
    )


def _synth(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.training.synth import synth_command

    parts = [p.strip() for p in args.parts.split(",")] if args.parts else None
    return synth_command(
        out_dir=args.out,
        count=args.count,
        seed=args.seed,
        fmt=args.fmt,
        size=args.size,
        fracture_rate=args.fracture_rate,
        parts=parts,
    )


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.training.train import train_command

    options = TrainOptions(
        data=args.data,
        dataset_format=args.dataset_format,
        task=args.task,
        architecture=args.architecture,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        loss=args.loss,
        seed=args.seed,
        report_dir=args.report_dir,
        resume=args.resume,
        demo=args.demo,
        version=args.model_version,
        max_minutes=args.max_minutes,
        workers=args.workers,
        crop_size=args.crop_size,
        localisation_weight=args.localisation_weight,
        mirror=args.mirror,
        tile=args.tile,
        tile_margin=args.tile_margin if args.tile else 0,
        rotation=args.rotation,
    )
    return train_command(settings, options)


def _evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.training.evaluate import evaluate_command

    options = EvaluateOptions(
        model=args.model,
        version=args.model_version,
        data=args.data,
        dataset_format=args.dataset_format,
        split=args.split,
        report_dir=args.report_dir,
        batch_size=args.batch_size,
    )
    return evaluate_command(settings, options)


def _models(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.models.registry import models_command

    return models_command(settings, as_json=args.json)


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.db.report import audit_command

    return audit_command(settings, args)


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.worker.status import status_command

    return status_command(settings, as_json=args.json)


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from boneflow.db.migrate import upgrade

    revision = upgrade(settings.resolved_database_url)
    print(json.dumps({"database": _redacted(settings.resolved_database_url), "revision": revision}))
    return 0


def _node(text: str, what: str) -> Destination:
    try:
        return parse_node(text, key=what)
    except ConfigError:
        raise SystemExit(f"boneflow: {what}: {text!r} is not AET@HOST:PORT") from None


def _redacted(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


logging.getLogger(__name__).addHandler(logging.NullHandler())
