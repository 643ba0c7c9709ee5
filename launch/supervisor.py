"""Start the model conversion, workers, core and frontends; watch them; stop them all.

Children run as `python -m worker|core|frontend` (launch imports none of them) in sessions of
their own, so that a terminal's Ctrl-C reaches launch alone and launch stops them in order.
Each child also watches launch: if launch is SIGKILLed, they exit by themselves.
"""

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import msgspec
import zmq

from launch.cli import config_from_args
from protocol.codec import Decoder
from protocol.config import API_KEY_ENV, METRICS_DIR_ENV, EngineConfig, ProcessReady, encode_config
from protocol.models import ModelError, ready_folder
from protocol.process import make_socket

logger = logging.getLogger("zeroserve")

STOP_GRACE_S = 5.0
WATCH_INTERVAL_S = 0.2


@dataclass
class Child:
    role: str
    process: subprocess.Popen


def serve(args: argparse.Namespace) -> int:
    """The whole life of `zeroserve serve`; returns the exit status."""
    started = time.monotonic()
    run_dir = tempfile.mkdtemp(prefix="zeroserve-")
    try:
        config_from_args(args, args.model or "", run_dir)  # bad options fail before any loading
        folder = resolve_model(args.model)
        if folder is None:
            return 2
        config = config_from_args(args, folder, run_dir)
        return Supervisor(config, started, args.api_key).run()
    except ValueError as error:
        logger.error("%s", error)
        return 2
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def listen_http(host: str, port: int) -> socket.socket:
    """The one listening socket every frontend's HTTP server accepts on (they inherit it).
    ValueError, one clear line, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"--http-port {port}: cannot listen on {host}: {error.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def resolve_model(model: str | None) -> str | None:
    """The HF folder to serve (a GGUF file is converted once and cached), or None on failure.
    Converting takes torch and transformers, so it runs in a python of its own; a folder, or a
    GGUF file converted before, is found here (that python's imports took 3-4 s of start-up)."""
    try:
        folder = ready_folder(model)
    except ModelError as error:
        logger.error("%s", error)
        return None
    if folder is not None:
        return folder
    command = [sys.executable, "-m", "worker.model_loader"] + (["--model", model] if model else [])
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return None
    return result.stdout.strip().splitlines()[-1]


class Supervisor:
    def __init__(self, config: EngineConfig, started: float, api_key: str | None = None) -> None:
        self.config = config
        self.started = started
        self.api_key = api_key
        self.http_socket: socket.socket | None = None
        self.children: list[Child] = []
        self.stop_signal: int | None = None
        self.ready = False
        self.lost_frontends: set[str] = set()

    def run(self) -> int:
        context = zmq.Context()
        reports = make_socket(context, zmq.PULL, self.config.launch_address, bind=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        logger.info("starting %d worker(s), the core and %d frontend(s); sockets in %s",
                    self.config.workers, self.config.frontends, self.config.run_dir)
        try:
            if self.config.http_port is not None:
                self.http_socket = listen_http(self.config.host, self.config.http_port)
            self._start_children()
            status = self._wait_ready(reports)
            if status is None:
                status = self._watch()
            return status
        finally:
            self._stop_children()
            if self.http_socket is not None:
                self.http_socket.close()
            reports.close()
            context.term()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def _start_children(self) -> None:
        config_json = encode_config(self.config)
        workers = [
            self._spawn(f"worker-{rank}", ["worker", "--config", config_json, "--rank", str(rank)])
            for rank in range(self.config.workers)
        ]
        pids = ",".join(str(w.process.pid) for w in workers)
        core = self._spawn("core", ["core", "--config", config_json, "--worker-pids", pids])
        http: list[str] = []
        fds: tuple[int, ...] = ()
        if self.http_socket is not None:
            http, fds = ["--http-fd", str(self.http_socket.fileno())], (self.http_socket.fileno(),)
        env = None
        if self.http_socket is not None:
            # The frontends' latency histograms, which any one's /metrics adds up.
            metrics_dir = os.path.join(self.config.run_dir, "metrics")
            os.makedirs(metrics_dir, exist_ok=True)
            env = {**os.environ, METRICS_DIR_ENV: metrics_dir}
            if self.api_key:
                env[API_KEY_ENV] = self.api_key
        for index in range(self.config.frontends):
            args = ["frontend", "--config", config_json, "--index", str(index), "--watch-pids", str(core.process.pid)]
            self._spawn(f"frontend-{index}", args + http, fds, env)

    def _spawn(
        self, role: str, module_args: list[str], pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
    ) -> Child:
        process = subprocess.Popen(
            [sys.executable, "-m", *module_args], start_new_session=True, pass_fds=pass_fds, env=env
        )
        child = Child(role, process)
        self.children.append(child)
        return child

    def _wait_ready(self, reports: zmq.Socket) -> int | None:
        """None once the core and every frontend reported ready; else the exit status."""
        decoder = Decoder(ProcessReady)
        expected = {"core"} | {f"frontend-{i}" for i in range(self.config.frontends)}
        while expected:
            status = self._check_children()
            if status is not None:
                return status
            if not reports.poll(int(WATCH_INTERVAL_S * 1000)):
                continue
            try:
                report = decoder.decode(reports.recv_multipart())
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                logger.error("bad report from a child: %s", error)
                continue
            if report.error:
                logger.error("%s failed to start: %s", report.role, report.error)
                return 2
            expected.discard(report.role)
            self._announce(report)
        if self.config.http_port is not None:
            sys.stdout.write(f"http: http://{self.config.host}:{self.config.http_port}\n")
            sys.stdout.flush()
        logger.info("ready in %.1f s", time.monotonic() - self.started)
        self.ready = True
        return None

    def _announce(self, report: ProcessReady) -> None:
        if report.role.startswith("frontend-"):
            sys.stdout.write(f"{report.role}: {report.detail}\n")
            sys.stdout.flush()
        else:
            logger.info("%s ready: %s", report.role, report.detail)

    def _watch(self) -> int:
        while True:
            status = self._check_children()
            if status is not None:
                return status
            time.sleep(WATCH_INTERVAL_S)

    def _check_children(self) -> int | None:
        """0 after Ctrl-C / SIGTERM (1 if a frontend died meanwhile), 1 when the core or a
        worker died, None while they run. A dead frontend does not stop the others: the core
        aborts its requests and the other frontends go on serving."""
        if self.stop_signal is not None:
            logger.info("stopping (%s)", signal.Signals(self.stop_signal).name)
            return 1 if self.lost_frontends else 0
        for child in self.children:
            code = child.process.poll()
            if code is None or child.role in self.lost_frontends:
                continue
            if child.role.startswith("frontend-") and self.ready:
                logger.error("%s exited with status %s: the other processes go on", child.role, code)
                self.lost_frontends.add(child.role)
                continue
            logger.error("%s exited with status %s: stopping everything", child.role, code)
            return 1
        if self.lost_frontends and len(self.lost_frontends) == self.config.frontends:
            logger.error("every frontend is gone: stopping")
            return 1
        return None

    def _stop_children(self) -> None:
        """SIGTERM in reverse start order, the frontends first, and each group gone (or killed
        after STOP_GRACE_S) before the next is asked: a frontend that saw the core go first
        would log it as lost."""
        for role in ("frontend", "core", "worker"):
            group = [c for c in self.children if c.role.startswith(role) and c.process.poll() is None]
            for child in group:
                child.process.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                try:
                    child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop in %.0f s: killing it", child.role, STOP_GRACE_S)
                    child.process.kill()
                    child.process.wait()
