"""Entry point for ``python -m loadtest.suite``."""

from loadtest.suite.run import main

if __name__ == "__main__":
    raise SystemExit(main())
