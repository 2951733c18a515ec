"""python -m jlora: inspect, merge, export-peft, import-peft, and one-line errors."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import bump
from safetensors.numpy import save_file

import jlora
from jlora._checkpoint import save
from jlora._cli import main
from jlora._paths import flatten


@pytest.fixture
def setup(tmp_path):
    model = nn.Sequential([nn.Dense(8, name="up"), nn.relu, nn.Dense(3, name="down")])
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    trainable = bump(trainable)
    base = tmp_path / "base.safetensors"
    save_file({k: np.asarray(v) for k, v in flatten(params).items()}, str(base))
    save(tmp_path / "adapter", trainable, cfg, frozen=frozen)
    return model, x, params, trainable, cfg, tmp_path, base


def test_help_and_bad_input_exit_nonzero_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jlora", "merge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "adapter strength" in out.stdout
    out = subprocess.run([sys.executable, "-m", "jlora", "inspect", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("jlora inspect: error:")


def test_inspect_merge_and_peft_round_trip(setup, capsys):
    model, x, params, trainable, cfg, tmp, base = setup
    assert main(["inspect", str(tmp / "adapter")]) == 0
    assert '"rank": 2' in capsys.readouterr().out
    assert main(["merge", str(tmp / "adapter"), str(base), str(tmp / "merged.safetensors")]) == 0
    from safetensors.numpy import load_file

    merged = jlora._paths.nest({k: jnp.asarray(v) for k, v in load_file(str(tmp / "merged.safetensors")).items()})
    want = jlora.wrap(model.apply, cfg)(params, trainable, x)
    np.testing.assert_allclose(model.apply(merged, x), want, rtol=1e-5, atol=1e-6)
    assert main(["export-peft", str(tmp / "adapter"), str(base), str(tmp / "peft")]) == 0
    assert json.loads((tmp / "peft" / "adapter_config.json").read_text())["r"] == 2
    assert main(["inspect", str(tmp / "peft")]) == 0
    assert "lora_A.weight" in capsys.readouterr().out
    assert main(["import-peft", str(tmp / "peft"), str(base), str(tmp / "back")]) == 0
    back, back_cfg = jlora._checkpoint.restore(tmp / "back", params)
    np.testing.assert_allclose(jlora.wrap(model.apply, back_cfg)(params, back, x), want, rtol=1e-6)


def test_merge_refuses_to_overwrite(setup, capsys):
    _, _, _, _, _, tmp, base = setup
    assert main(["merge", str(tmp / "adapter"), str(base), str(base)]) == 1
    assert "exists; choose a new output path" in capsys.readouterr().err
