"""Command-line interface. Each topic module adds its subcommands to `app`."""

from jwth.cli.app import app
from jwth.cli import probe  # noqa: F401  (extract, probe, demo, encoders)
from jwth.cli import slides  # noqa: F401
from jwth.cli import pretrain  # noqa: F401
from jwth.cli import nuclei  # noqa: F401
from jwth.cli import finetune  # noqa: F401
from jwth.cli import benchmark  # noqa: F401


def plain_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one ``warning: <message>`` line: no category, source file or source line."""
    return f"warning: {message}\n"


def main() -> None:
    """Entry point of the `jwth` console script (warnings printed as plain lines)."""
    import warnings

    warnings.formatwarning = plain_warning
    app()
