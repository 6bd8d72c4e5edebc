"""``python -m sarai_router`` runs the CLI."""

from .cli import main

main()
