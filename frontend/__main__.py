"""`python -m frontend --config <json> --index I --watch-pids PID[,PID] [--http-fd FD]`"""

import argparse

from protocol.config import decode_config

from frontend.main import run_frontend


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m frontend")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--index", type=int, required=True, help="this frontend's index")
    parser.add_argument("--watch-pids", default="", help="the core's pid(s), comma-separated")
    parser.add_argument("--http-fd", type=int, default=None, help="the HTTP listening socket launch made")
    args = parser.parse_args()
    watch_pids = [int(pid) for pid in args.watch_pids.split(",") if pid]
    run_frontend(decode_config(args.config), args.index, watch_pids, args.http_fd)


if __name__ == "__main__":
    main()
