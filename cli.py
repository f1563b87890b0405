"""Run the qwen35-lite command line from a checkout: `python cli.py run --model DIR "Hello"`."""

from qwen35_lite.cli import main

if __name__ == "__main__":
    main()
