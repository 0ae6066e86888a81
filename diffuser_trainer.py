"""The command line: train and evaluate DiffMIC-v2 (or DiffMIC v1: model.method=diffmic_v1).

    python diffuser_trainer.py [fit|validate|test|predict] [--config FILE] [--ckpt PATH|best|last]
                               [--out FILE] [--input DIR|LIST|IMAGE] [--explain DIR [--explain-max N]]
                               [key.sub=value ...]

A config error ends the command with exit code 2 and one line that names the key or the file; a diverged training
with 3, a file that could not be written with 5 (durable.py), Ctrl-C with 130 and SIGTERM with 143, each with one
line that says what was kept (faults.py). The commands themselves are the Python API, diffmic/api.py: this file
parses the command line, calls it and turns its errors into the exit codes (faults.exit_code).
"""

from __future__ import annotations

import argparse
import sys

from diffmic import api
from diffmic.api import COMMANDS, check_command_options
from diffmic.config import load_config
from diffmic.faults import exit_code
from diffmic.utils import setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffuser_trainer.py",
        description="Train and evaluate DiffMIC-v2 (model.method=diffmic_v1: DiffMIC v1).",
        epilog="commands: fit (default), validate, test, predict; overrides look like optim.lr=5e-4",
    )
    parser.add_argument("words", nargs="*", metavar="[command] key.sub=value", help="command, then overrides")
    parser.add_argument("--config", help="YAML config (default: configs/demo.yml)")
    parser.add_argument("--ckpt", help="checkpoint: a path, best or last (fit: resume from it)")
    parser.add_argument("--out", help="where validate/test/fit write metrics JSON, or predict its CSV")
    parser.add_argument("--explain", metavar="DIR", help="predict: a PNG per image of what guided its prediction")
    parser.add_argument("--explain-max", type=int, metavar="N", help="predict --explain: the first N images only")
    parser.add_argument("--input", help="predict: a folder of images, a CSV list of paths or one image, without labels")
    parser.add_argument("--debug", action="store_true", help="a diverged or interrupted run shows its traceback")
    args = parser.parse_intermixed_args(argv)
    args.command = args.words.pop(0) if args.words and args.words[0] in COMMANDS else "fit"
    bad = [w for w in args.words if "=" not in w]
    if bad:
        parser.error(f"unknown command {bad[0]!r}: use one of {', '.join(COMMANDS)}, then key.sub=value overrides")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    cfg = None
    try:
        cfg = load_config(args.config, args.words)
        check_command_options(args.command, args.input, args.explain, args.explain_max)
        if args.command == "predict":
            api.predict(
                cfg, ckpt=args.ckpt, images=args.input, out=args.out, explain=args.explain, explain_max=args.explain_max
            )
        else:  # fit, validate, test
            getattr(api, args.command)(cfg, ckpt=args.ckpt, out=args.out)
    except Exception as err:  # one line and the documented exit code (faults.exit_code)
        return exit_code(err, cfg, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
