"""``python -m medexplain``: the command line (:mod:`medexplain.cli`)."""
from medexplain.cli import main

main()
