"""pytest-benchmark suite setup: the bench modules import each other by name."""


