"""`python -m worker --config <EngineConfig as JSON> --rank R`."""

import argparse

from protocol.config import decode_config
from worker.main import run_worker


def main() -> None:
    parser = argparse.ArgumentParser(description="zeroserve worker process")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    run_worker(decode_config(args.config), args.rank)


if __name__ == "__main__":
    main()
