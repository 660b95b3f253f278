"""``python -m rayclust JOB [flags]``: the ``rayclust`` command without installing it."""
from rayclust.commands import main

main()
