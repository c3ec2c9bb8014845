"""`python -m server serve ...` is `trimode serve ...`."""

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
