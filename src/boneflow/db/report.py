"""``boneflow audit``: the trail as a table or JSON, and ``--verify`` of the hash chain."""

from __future__ import annotations

import argparse
import json
import sys

from boneflow.config import Settings
from boneflow.db.audit import Audit, TrailFilter
from boneflow.db.migrate import upgrade


def audit_command(settings: Settings, args: argparse.Namespace) -> int:
    """Print the audit trail, or verify it (exit 1 naming each broken row)."""
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        if args.verify:
            return _verify(audit, as_json=args.json)
        entries = audit.trail(
            TrailFilter(
                study_instance_uid=args.study,
                patient_id=args.patient,
                status=args.status,
                since=args.since,
                until=args.until,
                limit=args.limit,
            )
        )
    finally:
        audit.close()
    if args.json:
        rows = [
            {
                "id": e.id,
                "recorded_at": e.recorded_at.isoformat(),
                "event": e.event,
                "status": e.status,
                "study_instance_uid": e.study_instance_uid,
                "patient_id": e.patient_id,
                "sop_instance_uid": e.sop_instance_uid,
                "detail": e.detail,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>6}  {'time (UTC)':<26} {'event':<12} {'status':<12} {'SOP instance':<40} detail")
    for e in entries:
        when = e.recorded_at.strftime("%Y-%m-%d %H:%M:%S.%f")
        sop = (e.sop_instance_uid or "-")[-40:]
        print(f"{e.id:>6}  {when:<26} {e.event:<12} {e.status:<12} {sop:<40} {e.detail}")
    print(f"{len(entries)} entries", file=sys.stderr)
    return 0


def _verify(audit: Audit, *, as_json: bool) -> int:
    problems = audit.verify()
    seq, head = audit.head()
    if as_json:
        print(
            json.dumps(
                {
                    "ok": not problems,
                    "rows": seq,
                    "head": head,
                    "problems": [str(p) for p in problems],
                }
            )
        )
    else:
        for problem in problems:
            print(f"TAMPERED {problem}")
        state = "BROKEN" if problems else "intact"
        print(f"audit chain {state}: {seq} rows, head {head}")
    return 1 if problems else 0
