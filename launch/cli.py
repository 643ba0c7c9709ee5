"""`zeroserve serve` options → `EngineConfig`. A bad option fails with one clear line."""

import argparse
import logging
import os
import sys
from typing import Sequence

import msgspec

from protocol.config import API_KEY_ENV, EngineConfig

logger = logging.getLogger("zeroserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroserve")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the engine and serve clients")
    serve.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--frontends", type=int, default=1, help="API server processes")
    serve.add_argument("--workers", type=int, default=1, help="tensor-parallel size")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8100, help="frontend i listens on PORT+i")
    serve.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="default: float32 on cpu, bfloat16 on cuda")
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048)
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--kv-cache-memory", type=_memory, default=0.1,
                       help="bytes (e.g. 2GiB, 500000000) or a fraction of free device memory (e.g. 0.2)")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--paused-requests", choices=["hold", "reject"], default="hold")
    serve.add_argument("--http-port", type=int, default=None,
                       help="every frontend also serves HTTP (OpenAI, vLLM and SGLang routes) on this port")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"HTTP routes but /health and /metrics need 'Authorization: Bearer KEY' "
                            f"(or ${API_KEY_ENV})")
    serve.add_argument("--served-model-name", default=None, help="the model's name over HTTP (default: --model)")
    return parser


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def _memory(text: str) -> float:
    lowered = text.strip().lower()
    for unit, scale in UNITS.items():
        if lowered.endswith(unit):
            return float(lowered[: -len(unit)]) * scale
    try:
        return float(lowered)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kv-cache-memory takes bytes or a fraction, got {text!r}") from None


# Device nodes of the GPU drivers torch.cuda can use (NVIDIA; AMD's ROCm; WSL's GPU).
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def detect_device() -> str:
    """cuda when torch sees a GPU. Where no GPU driver is loaded torch cannot, and its import
    (2 s of start-up on a small machine) is skipped."""
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def config_from_args(args: argparse.Namespace, model_folder: str, run_dir: str) -> EngineConfig:
    """Raises ValueError with the first bad option."""
    device = args.device or detect_device()
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    try:
        return EngineConfig(
            model=model_folder,
            run_dir=run_dir,
            device=device,
            dtype=dtype,
            frontends=args.frontends,
            workers=args.workers,
            host=args.host,
            port=args.port,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            max_model_len=args.max_model_len,
            paused_requests=args.paused_requests,
            http_port=args.http_port,
            served_model_name=args.served_model_name or served_name(args.model),
        )
    except msgspec.ValidationError as error:
        raise ValueError(str(error)) from None


def served_name(model: str | None) -> str:
    """The name HTTP clients use for the model: `--model` as given, as vLLM does."""
    if model is None:
        return DEFAULT_MODEL_NAME
    return model.rstrip("/") or model


def main(argv: Sequence[str] | None = None) -> None:
    from launch.supervisor import serve

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s zeroserve: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    sys.exit(serve(args))


if __name__ == "__main__":
    main()
