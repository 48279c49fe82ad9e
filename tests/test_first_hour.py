"""A new user's first hour, through the real CLI (`python -m pd ...` subprocesses): a mistyped --model-path or a
busy port answers at once with one line naming the flag (exit 2, no traceback, nothing loaded); Ctrl-C while
`pd up` starts stops it within 3 s and says so; `pd up --api-key-file` keeps the key out of every process's argv
and its sample curl works as printed; the balancer sends /abort_request and /flush_cache to every instance; and
`pd up` killed outright (SIGKILL) takes its children with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_pd_up import REPO, Output, _bindable, _cmdline, _descendants, _free_run, _running
from tests.tiny_checkpoints import make_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("first_hour") / "qwen3_moe"))


def _pd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pd", *argv], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip


def _assert_one_line_usage_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_names_the_flag_for_each_bad_model_path_before_loading(
    tmp_path: Path, checkpoint: str, listener: int
) -> None:
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for f in Path(checkpoint).iterdir():
        if f.name in ("config.json",) or f.suffix == ".safetensors":
            (no_tokenizer / f.name).symlink_to(f)
    cases = {
        "/nonexistent": ("--model-path /nonexistent", "no such directory"),
        str(tmp_path): ("--model-path", "no config.json"),
        str(no_weights): ("--model-path", "no weights", "*.safetensors"),
        str(no_tokenizer): ("--model-path", "no tokenizer files", "--skip-tokenizer-init"),
    }
    for path, needles in cases.items():
        _assert_one_line_usage_error(_pd("serve", "--model-path", path, "--device", "cpu"), *needles)
    # --tokenizer-path fills the gap: the model checks pass and the (busy) port is next.
    tok = tmp_path / "tok"
    write_tokenizer(str(tok))
    r = _pd("serve", "--model-path", str(no_tokenizer), "--tokenizer-path", str(tok), "--port", str(listener),
            "--device", "cpu")  # fmt: skip
    _assert_one_line_usage_error(r, f"--port {listener}", "already in use")


def test_serve_and_up_refuse_a_busy_port_before_loading(listener: int, checkpoint: str) -> None:
    started = time.monotonic()
    r = _pd("serve", "--model-path", checkpoint, "--device", "cpu", "--port", str(listener))
    _assert_one_line_usage_error(r, f"--port {listener}", "already in use", "choose another --port")
    r = _pd("lb", "--port", str(listener), "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2")
    _assert_one_line_usage_error(r, f"--port {listener}", "already in use")
    r = _pd("up", "--model-path", checkpoint, "--device", "cpu", "--port", str(listener))
    _assert_one_line_usage_error(r, str(listener), "already in use", "--port")
    r = _pd("up", "--model-path", "/nonexistent", "--device", "cpu", "--port", str(listener))
    _assert_one_line_usage_error(r, "--model-path /nonexistent")
    assert time.monotonic() - started < 30  # nothing was loaded


def test_ctrl_c_while_up_starts_stops_within_3_s_and_says_why(checkpoint: str) -> None:
    port, bootstrap = _free_run(3), _free_run(1)
    argv = [sys.executable, "-m", "pd", "up", "--model-path", checkpoint, "--device", "cpu", "--port", str(port),
            "--bootstrap-port", str(bootstrap)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    out = Output(proc)
    try:
        deadline = time.monotonic() + 60
        while len(_descendants(proc.pid)) < 2 or "[decode-0]" not in out.text:  # the instances are starting
            assert proc.poll() is None and time.monotonic() < deadline, out.text[-4000:]
            time.sleep(0.1)
        children = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        rc = proc.wait(3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.join()
    assert rc == 128 + signal.SIGINT, out.text[-4000:]
    assert "interrupted by SIGINT during start-up" in out.text and "exited with code" not in out.text, out.text[-4000:]
    assert "Traceback" not in out.text, out.text[-4000:]
    _assert_gone(children, [port, port + 1, port + 2, bootstrap])


def _assert_gone(children: dict[int, int], ports: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while left := {pid: _cmdline(pid) for pid, started in children.items() if _running(pid, started)}:
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.1)
    while busy := [p for p in ports if not _bindable(p)]:
        assert time.monotonic() < deadline, f"ports still in use: {busy}"
        time.sleep(0.1)


def test_up_with_a_key_file_serves_the_printed_curl_fans_out_admin_posts_and_dies_with_its_children(
    checkpoint: str, tmp_path: Path
) -> None:
    key = "sk-first-hour-" + os.urandom(4).hex()
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    port, bootstrap = _free_run(3), _free_run(1)
    argv = [sys.executable, "-m", "pd", "up", "--model-path", checkpoint, "--device", "cpu", "--port", str(port),
            "--bootstrap-port", str(bootstrap), "--api-key-file", str(key_file)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    out = Output(proc)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops everything" not in out.text:
            assert proc.poll() is None, f"pd up exited with {proc.returncode}:\n{out.text[-6000:]}"
            assert time.monotonic() < deadline, f"no ready banner:\n{out.text[-6000:]}"
            time.sleep(0.2)
        children = _descendants(proc.pid)
        assert len(children) >= 3 and not [pid for pid in children if key in _cmdline(pid)], "key in a child's argv"
        # The sample curl, run as printed, is answered.
        curl = next(line.strip() for line in out.lines if line.strip().startswith("curl "))
        assert f"Authorization: Bearer $(cat {key_file})" in curl, curl
        r = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        assert json.loads(r.stdout)["object"] == "chat.completion", r.stdout + r.stderr
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=10).status_code == 401

        # Admin POSTs reach both instances.
        r = httpx.post(f"{url}/abort_request", json={"abort_all": True}, headers=auth, timeout=30)
        assert r.status_code == 200 and set(r.json()["workers"].values()) == {200}, r.text
        instances = {f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"}
        assert set(r.json()["workers"]) == instances, r.text
        r = httpx.post(f"{url}/flush_cache", headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        flushed = {u for u, s in r.json()["workers"].items() if s == 200}
        assert flushed | set(r.json().get("unsupported", [])) == instances, r.text

        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: the children must notice by themselves
        proc.wait(10)
        _assert_gone(children, [port, port + 1, port + 2, bootstrap], timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.join()
    assert "Traceback" not in out.text, out.text[-4000:]


def test_the_banner_curl_carries_the_key_the_way_it_was_given(tmp_path: Path) -> None:
    from launch.up import _without_flags, sample_auth_header
    from pd.server_args import ServerArgs

    key_file = tmp_path / "key"
    key_file.write_text("sk-file\n")
    given = {
        ("--api-key", "sk-x y"): " -H 'Authorization: Bearer sk-x y'",
        ("--api-key-file", str(key_file)): f' -H "Authorization: Bearer $(cat {key_file})"',
        (): ' -H "Authorization: Bearer $PD_API_KEY"',
    }
    for argv, header in given.items():
        ns = ServerArgs.from_cli(list(argv))  # PD_API_KEY is read only when no flag is given
        args = ns if argv else ServerArgs(api_key="sk-env")
        assert sample_auth_header(list(argv), args) == header
    assert sample_auth_header([], ServerArgs()) == ""
    assert ServerArgs.from_cli(["--api-key-file", str(key_file)]).api_key == "sk-file"
    argv = ["--device", "cpu", "--api-key", "k", "--api-key-file=f", "--port", "1"]
    assert _without_flags(argv, ("--api-key", "--api-key-file")) == ["--device", "cpu", "--port", "1"]


def test_pd_api_key_env_and_key_file_are_read_and_checked() -> None:
    env = dict(os.environ, PD_API_KEY="sk-env")
    r = _pd("serve", "--api-key", "a", "--api-key-file", "b", env=env)
    assert r.returncode == 2 and "give --api-key or --api-key-file, not both" in r.stderr, r.stderr
    r = _pd("lb", "--api-key-file", "/nonexistent", "--decode", "http://127.0.0.1:1", env=env)
    assert r.returncode == 2 and "--api-key-file /nonexistent: cannot read it" in r.stderr, r.stderr
    from pd.server_args import resolve_api_key

    assert resolve_api_key(None, None, {"PD_API_KEY": "sk-env"}) == "sk-env"
    assert resolve_api_key("sk-flag", None, {"PD_API_KEY": "sk-env"}) == "sk-flag"
    assert resolve_api_key(None, None, {}) is None
