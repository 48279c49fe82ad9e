"""`pd bench --dataset multi-turn --backend chat --request-rate 4 --plot DIR` against a real `pd serve` (a tiny
Mixtral checkpoint on CPU): the table, the JSON and the PNG plots are written, every turn succeeds, and the
prompts the server counted are the chat template of each conversation so far.

Oracle for prompt sizes: the checkpoint's tokenizer applying its chat template (transformers), in this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launch.cli import main as cli_main
from pd.bench.conversations import multi_turn_conversations
from tests.server_process import pd_serve
from tests.tiny_checkpoints import make_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_multi_turn_chat_at_a_request_rate_writes_table_json_and_plots(tmp_path: Path, capsys: Any) -> None:
    from transformers import AutoTokenizer

    model = make_checkpoint("mixtral", str(tmp_path / "model"))
    plots = tmp_path / "plots"
    conversations, turns, seed = 2, 2, 3
    flags = ["--dataset", "multi-turn", "--backend", "chat", "--request-rate", "4", "--plot", str(plots),
             "--num-prompts", str(conversations), "--num-turns", str(turns), "--input-len-range", "4", "8",
             "--output-len-range", "2", "3", "--seed", str(seed), "--disable-progress"]  # fmt: skip
    with pd_serve(model) as url:
        assert cli_main(["bench", "--base-url", url, *flags]) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    for name in ("latency_cdf.png", "throughput.png"):
        assert (plots / name).read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((plots / "report.json").read_text())
    assert report["config"]["request_rate"] == 4 and report["config"]["dataset"] == "multi-turn"
    assert report["metrics"]["completed"] == conversations * turns and report["errors"] == {}

    tokenizer = AutoTokenizer.from_pretrained(model)

    def template_len(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer.encode(text, add_special_tokens=False))

    for c, conversation in enumerate(multi_turn_conversations(conversations, turns, (4, 8), (2, 3), seed)):
        first, second = report["requests"][turns * c : turns * c + 2]
        user = [{"role": "user", "content": text} for text in conversation.user_turns]
        assert first["prompt_len"] == template_len(user[:1])
        assert first["output_tokens"] == conversation.output_lens[0]  # ignore_eos: every token asked for
        # The second turn holds the first (prompt and answer) and then its own message.
        assert second["prompt_len"] >= first["prompt_len"] + template_len(user[1:2])
