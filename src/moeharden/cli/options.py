"""Shared option declarations of the CLI, as Typer ``Annotated`` aliases.

A command declares ``json_out: JsonOpt = False`` instead of repeating the option's flags and help;
defaults stay in the command's signature, where Typer reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout; no progress bars.")]
PushOpt = Annotated[str | None, typer.Option(
    "--push-to-hub", metavar="REPO_ID",
    help="Upload the output to this Hub repo (private unless --public; token from HF_TOKEN or the hf login "
         "cache, never printed).")]
PublicOpt = Annotated[bool, typer.Option("--public", help="With --push-to-hub: create the repo public.")]
CkptArg = Annotated[str, typer.Argument(help="Checkpoint: a local directory or a Hub repo id.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
TaskOpt = Annotated[list[str] | None, typer.Option(
    "--task", "-t", help="Preset name, task file, PRESET=local-file, or lm-eval:NAME. Repeatable. "
                         "Default: the checkpoint's moeharden-tasks.yaml.")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow the checkpoint's own Python code (off by default).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Seeded sample of N examples per task.")]
SkipSelfCheckOpt = Annotated[bool, typer.Option(
    "--skip-self-check", help="Do not verify the family adapter on a tiny random model first (experts only).")]
PubkeyOpt = Annotated[Path | None, typer.Option("--pubkey", help="Public key (KEYDIR/moeharden.pub).")]
