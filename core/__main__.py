import argparse

from core.main import run_core
from protocol.config import decode_config


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m core")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--worker-pids", default="", help="comma-separated pids of the worker ranks")
    args = parser.parse_args()
    pids = [int(pid) for pid in args.worker_pids.split(",") if pid]
    run_core(decode_config(args.config), pids)


if __name__ == "__main__":
    main()
