"""`python -m qwen35_lite.cli ...`."""

from . import main

main()
