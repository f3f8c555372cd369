"""The one `jwth` command-line entry; subcommand modules register on `app`."""

import typer

app = typer.Typer(
    name="jwth",
    help="JWTH toolkit: frozen pathology encoders, token caches, attention pooling, "
    "self-supervised pretraining and whole-slide processing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
