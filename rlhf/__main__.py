"""`rlhf` and `python -m rlhf`: the C allocator setting first (rlhf.allocator, which restarts the
process with it before anything heavy is imported), then the command line (rlhf.cli)."""

from rlhf.allocator import restart_with_tuned_allocator


def main() -> None:
    restart_with_tuned_allocator()  # here, before typer and the config are imported: a cheaper restart
    from rlhf.cli import main as cli_main

    cli_main()  # its own restart call (for `python -m rlhf.cli`) finds the setting in place and returns


if __name__ == "__main__":
    main()
