"""``tlvr data …``: fetch, synth and check."""

from __future__ import annotations

import typer

data_app = typer.Typer(help="Fetch weights and datasets, write the synthetic set, scan videos.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from . import data_fetch, data_video  # noqa: F401  (they add their commands to data_app)

    app.add_typer(data_app, name="data")
