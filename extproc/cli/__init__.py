"""The ``extproc`` command line: ``main`` is its entry point (pyproject ``[project.scripts]``)."""

from extproc.cli.main import main
from extproc.cli.options import sample_policy_dir

__all__ = ["main", "sample_policy_dir"]
