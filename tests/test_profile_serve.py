"""profile_serve --py-spy's summary of a collapsed-stack file, against counts worked out by hand.

(The rest of profile_serve needs a GPU; its py-spy sampling itself was run against a CPU `pd serve`.)"""

from __future__ import annotations

from benchmarks.profile_serve import summarize_collapsed


def test_summary_counts_own_time_at_the_leaf_and_each_frame_once_per_stack(tmp_path):
    raw = tmp_path / "stacks.raw"
    # 10 samples: main->step->build (6), main->step->forward (3), main->idle (1); "step" recurses in one stack
    raw.write_text("main;step;build 4\nmain;step;step;build 2\nmain;step;forward 3\nmain;idle 1\n\n")
    lines = summarize_collapsed(str(raw), rows=10).splitlines()
    own = lines[lines.index("-- own time") + 1 : lines.index("-- with callees")]
    callees = lines[lines.index("-- with callees") + 1 :]
    assert lines[0] == "10 samples"
    assert own == [" 60.0%  build", " 30.0%  forward", " 10.0%  idle"]
    assert callees[0] == "100.0%  main" and " 90.0%  step" in callees  # the recursive stack counts step once
    assert " 60.0%  build" in callees and len(callees) == 5
