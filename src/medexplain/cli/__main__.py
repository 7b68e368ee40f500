"""``python -m medexplain.cli``: the ``medexplain`` command."""
from . import main

main()
