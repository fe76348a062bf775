"""`dlt-train`: compose the config, then train here (`cluster=local`)."""

from __future__ import annotations

import sys

from jobs.cli import compose_config, errors_as_one_line, print_help, to_plain, wants_help
from trainer import distributed
from trainer.config import load_config
from trainer.train import run

USAGE = (
    "model=<preset> parallel=<preset> data=<preset> train.max_steps=N run.dir=DIR "
    "resume=auto|none|PATH precision=fp32|bf16|fp16 [key=value ...]"
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print_help("dlt-train", "train", USAGE)
        return
    with errors_as_one_line("dlt-train"):
        composed = compose_config("train", argv)
        world_size = distributed.world_from_env().size
        cfg = load_config(to_plain(composed, drop=("cluster",)), world_size=world_size)
        run(cfg)
    # Only after success: on an error this rank exits at once (torchrun then stops the others)
    # instead of waiting in a barrier for ranks that are stuck in a collective.
    distributed.shutdown()


if __name__ == "__main__":
    main()
