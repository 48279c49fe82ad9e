"""Start-up checks that run before any weight is loaded: the checkpoint directory and the ports.

Each failure is a `PreflightError` whose message is one line that names the flag and says what to do, so a
mistyped path or a port left busy costs the user a second, not a model load and a traceback.
"""

from __future__ import annotations

import glob
import os
import socket
from collections.abc import Iterable

from pd.server_args import ServerArgs

# Any one of these makes a directory loadable by transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")  # fmt: skip


class PreflightError(Exception):
    """A user mistake found before start-up; the message is one line naming the flag and the fix."""


def check_serve(args: ServerArgs) -> None:
    """Everything `pd serve` can check before loading: the checkpoint and tokenizer files, then the ports this
    process will bind (HTTP on node 0, the bootstrap server of a prefill instance). Raises PreflightError."""
    check_model_files(args)
    ports: list[tuple[str, int]] = []
    if args.node_rank == 0:
        ports.append(("--port", args.port))
    if args.disaggregation_mode == "prefill" and args.disaggregation_transfer_backend == "mooncake":
        ports.append(("--disaggregation-bootstrap-port", args.disaggregation_bootstrap_port))
    check_ports(args.host, ports)


def check_model_files(args: ServerArgs) -> None:
    """--model-path is a checkpoint directory (config.json and *.safetensors), and the tokenizer directory has
    tokenizer files unless --skip-tokenizer-init. No --model-path (the built-in model) passes. Raises
    PreflightError."""
    path = args.model_path
    if path is None:
        return
    if not os.path.exists(path):
        hint = ""
        if not path.startswith(("/", ".", "~")) and path.count("/") == 1:
            hint = f" (a Hugging Face repo id? download it first: huggingface-cli download {path} --local-dir DIR)"
        raise PreflightError(f"--model-path {path}: no such directory{hint}; give a local checkpoint directory, "
                             "or leave --model-path out for the built-in tiny model")  # fmt: skip
    if not os.path.isdir(path):
        raise PreflightError(f"--model-path {path} is a file; give the checkpoint directory that holds config.json")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise PreflightError(f"--model-path {path} has no config.json; give a Hugging Face checkpoint directory")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        found = " (only PyTorch *.bin files, which pd does not load: save them as safetensors)" if glob.glob(
            os.path.join(path, "*.bin")) else ""  # fmt: skip
        raise PreflightError(f"--model-path {path} has no weights (*.safetensors){found}; give a directory with the "
                             "checkpoint's *.safetensors files")  # fmt: skip
    if args.skip_tokenizer_init:
        return
    tok = args.tokenizer_path or path
    flag = "--model-path" if tok == path else "--tokenizer-path"
    if not os.path.isdir(tok):
        raise PreflightError(f"--tokenizer-path {tok}: no such directory; give the directory with the tokenizer files")
    if not any(os.path.isfile(os.path.join(tok, name)) for name in TOKENIZER_FILES):
        raise PreflightError(f"{flag} {tok} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); give "
                             "--tokenizer-path DIR, or --skip-tokenizer-init to serve token ids only")  # fmt: skip


def check_ports(host: str, ports: Iterable[tuple[str, int]]) -> None:
    """Each (flag, port) can be bound on `host` now. Raises PreflightError naming the first busy one."""
    for flag, port in ports:
        if not port_free(host, port):
            raise PreflightError(f"{flag} {port} is already in use on {host}; choose another {flag} or stop the "
                                 "process listening there")  # fmt: skip


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind host:port now (SO_REUSEADDR, as uvicorn sets it: TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
