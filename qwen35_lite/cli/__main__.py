"""`python -m qwen35_lite.cli ...`."""

from .app import main

main()
