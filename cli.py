"""Run the qwen35-lite command line from a checkout: `python cli.py run --model DIR "Hello"`."""

if __name__ == "__main__":
    try:
        from qwen35_lite.cli import main
    except KeyboardInterrupt:  # Ctrl+C while Python imports the (light) package: exit as the CLI does
        raise SystemExit(130) from None
    main()
