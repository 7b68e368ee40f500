"""``python -m medexplain.cli``: the ``medexplain`` command."""
from medexplain.cli import main

main()
