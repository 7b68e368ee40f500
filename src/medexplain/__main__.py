"""``python -m medexplain``: the command line (:mod:`medexplain.cli`)."""
from .cli import main

main()
