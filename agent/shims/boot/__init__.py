"""The folder put on the user's PYTHONPATH: ``sitecustomize`` installs the toolkit stand-ins'
finder."""
