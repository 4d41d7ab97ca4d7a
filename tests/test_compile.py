"""torch.compile of the stage transformer: same numbers as eager, the engine's ``train.compile``
switch, generation through ``maybe_compile``, and ``musiclm bench lm``.

The fast tests compile with the ``aot_eager`` backend: TorchDynamo traces the whole forward (with
``fullgraph=True`` any graph break is an error) and AOTAutograd builds the backward, without
inductor's C++ code generation (tens of seconds on a loaded CPU, minutes with a cold cache). The
slow tests use inductor, the backend training and the benchmark use.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from musiclm.config import ConfigError, section
from musiclm.lm import Transformer, TransformerConfig
from musiclm.lm.model import maybe_compile
from musiclm.train.run_config import TrainConfig

V, L = 97, 48


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=V, max_seq_len=L, **kw)).train()


def _loss_and_grads(model: Transformer, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _check_same(backend: str, **cfg) -> None:
    eager = _model(**cfg)
    compiled = maybe_compile(copy.deepcopy(eager), True, backend=backend, fullgraph=True)
    x = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    le, ge = _loss_and_grads(eager, x)
    lc, gc = _loss_and_grads(compiled, x)
    assert abs(le - lc) <= 1e-5 * abs(le), (le, lc)
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)
    # in place: the state dict keeps its names (checkpoints and exports of a compiled run load eagerly)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compiled_matches_eager_without_graph_breaks():
    _check_same("aot_eager")


def test_compiled_matches_eager_with_activation_checkpointing():
    _check_same("aot_eager", checkpointing=True)


def test_one_graph_for_repeated_training_steps():
    """The rotary table exists before the first compiled call (Transformer.compile builds it), so
    the second step reuses the first step's graph instead of compiling another."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = maybe_compile(_model(), True, backend="aot_eager")
    x = torch.randint(0, V, (2, L))
    for _ in range(3):
        m(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_maybe_compile_off_is_identity():
    m = _model()
    assert maybe_compile(m, False) is m and m._compiled_call_impl is None
    assert maybe_compile(m, True, backend="aot_eager") is m and m._compiled_call_impl is not None


def test_compiled_sampling_matches_eager():
    """Generation's hook: the KV-cached decode loop (a new position each call) gives the same tokens."""
    eager = _model().eval()
    compiled = maybe_compile(copy.deepcopy(eager), True, backend="aot_eager", dynamic=True)
    prefix = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    a = eager.sample(prefix, 6, temperature=0)
    b = compiled.sample(prefix, 6, temperature=0)
    assert torch.equal(a, b)


def test_train_compile_config_key():
    assert TrainConfig().compile is False  # off unless asked for (tens of seconds of start-up on CPU)
    assert section(TrainConfig, {"compile": True}, where="x: train").compile is True
    with pytest.raises(ConfigError, match="compile"):
        section(TrainConfig, {"compile": "maybe"}, where="x: train")


def test_bench_lm_three_models_eager():
    from musiclm.bench.lm import run

    r = run(
        d_model=32,
        n_layer=1,
        n_head=2,
        seq_len=16,
        batch_size=2,
        vocab_size=64,
        steps=1,
        repeats=1,
        warmup=1,
        compile=False,
    )
    assert {"ours", "plain", "gpt2"} <= set(r)
    assert r["ours"]["params"] == r["plain"]["params"] - 16 * 32 == r["gpt2"]["params"] - 16 * 32
    assert r["ratios"]["ours_eager_vs_plain_eager"] > 0
    assert r["goals"]["ours_compiled_vs_ours_eager"]["value"] is None  # not compiled: not reported


# ---------------------------------------------------------------------------------------------
# inductor (the real backend)


@pytest.mark.slow
def test_inductor_compiled_matches_eager():
    _check_same("inductor")


@pytest.mark.slow
def test_engine_honours_train_compile(tmp_path):
    """Two one-process launcher runs of the tiny semantic stage, train.compile false and true: the
    compiled one logs it and its compile time (startup/compile_s), and both have the same losses."""
    import train_utils as tu

    shards = tu.make_tiny_shards(str(tmp_path / "shards"), n_train=32, n_eval=16)
    losses = {}
    for flag in ("false", "true"):
        run_dir = str(tmp_path / f"run-{flag}")
        log = str(tmp_path / f"{flag}.log")
        extra = ["--max_steps", "2", "--set", f"train.compile={flag}", "train.log_every=1", "train.eval_every=0"]
        rc = tu.launch(1, tu.train_args("semantic", run_dir, shards, ds="cpu", extra=extra), log, timeout=600)
        assert rc == 0, tu.read_log(log)[-3000:]
        with open(os.path.join(run_dir, "startup.json")) as f:
            startup = json.load(f)
        text = tu.read_log(log)
        if flag == "true":
            assert "train.compile: model compiled" in text
            assert startup["compile_s"] > 0
        else:
            assert "compile_s" not in startup and "train.compile: model compiled" not in text
        losses[flag] = tu.train_losses(run_dir)
    assert sorted(losses["true"]) == sorted(losses["false"]) == [1, 2]
    for step, loss in losses["false"].items():
        assert abs(losses["true"][step] - loss) <= 1e-4 * abs(loss), (step, losses)
