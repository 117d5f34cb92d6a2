"""`python -m destfnd` and the `destfnd` command (`run`): the CLI, with a Ctrl-C while it
loads (its imports take a few tenths of a second) as quiet as one later: exit 130, no
traceback."""


def run() -> int:
    try:
        from destfnd.cli import main
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
