"""`pd up` as a new user runs it: one command starts prefill, decode and the load balancer; the README's sample
chat request gets a chat completion (and greedy chat equals transformers); Ctrl-C (SIGINT to the terminal's
process group, or to `pd up` alone) stops everything with exit code 0, leaving no process and no open port behind.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import free_port
from tests.tiny_checkpoints import load_hf, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
README_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
STOP_TIMEOUT_S = 30


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below root."""
    stats = {int(e): s for e in os.listdir("/proc") if e.isdigit() and (s := _stat(int(e))) is not None}
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (_, ppid, started) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _running(pid: int, started: int) -> bool:
    """The same process (not a reused pid) still exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    """Whether a listener could bind the port now: nothing listens there and no connection uses it as its local
    end (an ephemeral port of some client connection passes a connect probe but not pd up's bind check)."""
    from launch.up import _port_free

    return _port_free("127.0.0.1", port)


def _free_run(n: int) -> int:
    """A port P with P .. P + n - 1 all free (pd up puts the instances right after the balancer)."""
    for _ in range(100):
        base = free_port()
        if base + n < 65536 and all(_bindable(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


class Output:
    """pd up's stdout+stderr, read on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            self.lines.append(line.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> None:
        self._thread.join(10)


@pytest.mark.parametrize("interrupt", ["ctrl_c", "sigint_to_pd_up"])
def test_pd_up_answers_the_readme_request_and_sigint_stops_every_process(interrupt: str, tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**31)
    path = make_checkpoint("qwen3_moe", str(tmp_path / "qwen3_moe"), seed=seed)
    port, bootstrap = _free_run(3), free_port()  # balancer, prefill, decode; one bootstrap server
    ports = [port, port + 1, port + 2, bootstrap]
    argv = [sys.executable, "-m", "pd", "up", "--model-path", path, "--device", "cpu", "--port", str(port),
            "--bootstrap-port", str(bootstrap), "--chunked-prefill-size", "32"]
    # Its own session, like a shell's job: Ctrl-C reaches the whole process group.
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = Output(proc)
    try:
        deadline = time.monotonic() + 300
        while "PD cluster ready" not in out.text:
            assert proc.poll() is None, f"pd up exited with {proc.returncode}:\n{out.text[-6000:]}"
            assert time.monotonic() < deadline, f"no 'PD cluster ready' line:\n{out.text[-6000:]}"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": README_MESSAGES, "max_tokens": 32}, timeout=60)
        assert r.status_code == 200, r.text
        chat = r.json()
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant", chat
        assert isinstance(chat["choices"][0]["message"]["content"], str)
        assert chat["usage"]["completion_tokens"] == 32, chat  # the test checkpoint has no EOS

        # Greedy, the same request equals transformers on the chat template's tokens.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        prompt = tok.encode(tok.apply_chat_template(README_MESSAGES, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
        with torch.no_grad():
            ref = load_hf(path).generate(torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                                         max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": README_MESSAGES, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(prompt), r.json()
        assert r.json()["choices"][0]["message"]["content"] == tok.decode(ref, skip_special_tokens=True), seed

        # A profile through the balancer: each instance writes its trace, named after its role.
        traces = tmp_path / "traces"
        r = httpx.post(f"{url}/start_profile", timeout=60,
                       json={"output_dir": str(traces), "with_stack": False, "record_shapes": False})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/stop_profile", timeout=120)
        assert r.status_code == 200, r.text
        written = sorted(answer.splitlines()[1] for answer in r.json()["answers"].values())
        assert sorted(os.path.basename(w).split("-", 1)[1] for w in written) == [
            "decode-TP-0-DP-0.trace.json.gz", "prefill-TP-0-DP-0.trace.json.gz"] and all(map(os.path.exists, written))

        children = _descendants(proc.pid)
        names = [_cmdline(pid) for pid in children]
        assert sum(" serve " in n for n in names) == 2 and sum(" lb " in n for n in names) == 1, names
        # A long stream is in flight when the signal comes: it must end too, not hold the shutdown up.
        with httpx.Client(timeout=STOP_TIMEOUT_S) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", json={"messages": README_MESSAGES, "max_tokens": 2000, "stream": True}
        ) as stream:
            lines = stream.iter_lines()
            assert stream.status_code == 200 and any(line.startswith("data: ") for line in lines)
            if interrupt == "ctrl_c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            stopped = time.monotonic()
            try:
                events = [line for line in lines if line.startswith("data: ")]
                ended = events[-1] if events else "closed"
            except httpx.HTTPError as e:
                ended = f"broken: {e!r}"
        assert time.monotonic() - stopped < STOP_TIMEOUT_S, ended
        try:
            rc = proc.wait(max(STOP_TIMEOUT_S - (time.monotonic() - stopped), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"pd up still running {STOP_TIMEOUT_S} s after SIGINT:\n{out.text[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.join()
    assert rc == 0, out.text[-6000:]
    deadline = time.monotonic() + 10  # a child's own helpers (multiprocessing's) may take a moment more
    while left := {pid: _cmdline(pid) for pid, started in children.items() if _running(pid, started)}:
        assert time.monotonic() < deadline, f"left running after pd up exited: {left}"
        time.sleep(0.2)
    assert not [p for p in ports if _answers(p)], f"ports still answering: {[p for p in ports if _answers(p)]}"
    strays = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if path in _cmdline(pid)]
    assert not strays, {pid: _cmdline(pid) for pid in strays}
    # Stopping is not a crash: no process prints a traceback on the user's terminal.
    assert "Traceback" not in out.text, out.text[out.text.find("Traceback") - 300:][:6000]
