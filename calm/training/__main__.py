"""`python -m calm.training ...` (and `accelerate launch -m calm.training ...`): the `calm train` command."""

from calm.cli.train import train_command

if __name__ == "__main__":
    train_command(prog_name="python -m calm.training")
