"""Ray cluster launch files and job submission (see the README)."""
