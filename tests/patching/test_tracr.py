"""Ground truth by construction: tracr-compiled RASP programs, ported to TransformerLens. The compiled circuit's
paths explain the behaviour, their complement explains nothing, and each informative path is necessary."""

import pytest
import torch

pytest.importorskip("tracr", reason="the tracr extra (pip install 'probegen[tracr]': tracr-pypi, jax) is not installed")
pytest.importorskip("transformer_lens", reason="the lens extra (pip install 'probegen[lens]') is not installed")

from probegen.errors import ProbegenError  # noqa: E402
from probegen.patching.tracr_port import (compile_program, programs, sample_inputs, score_program, to_lens,  # noqa: E402
                                          tracr_residual, unembed_matrix)

NAMES = ["hist", "sort_unique", "frac_prevs", "pair_balance"]


@pytest.fixture(scope="module")
def compiled():
    return {name: compile_program(name) for name in NAMES}  # about 40 s of tracr compilation in all


@pytest.mark.parametrize("name", NAMES)
def test_port_reproduces_tracr(compiled, name):
    prog = compiled[name]
    model = to_lens(prog)
    x = sample_inputs(prog, 32, seed=0)
    with torch.no_grad():
        ours = model(x)
    theirs = tracr_residual(prog, x) @ torch.tensor(unembed_matrix(prog))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    if prog.categorical:  # and the decoded program output: argmax of the output scores, after BOS
        a = prog.assembled
        decoded = a.apply(a.input_encoder.decode(x[0].tolist())).decoded[1:]
        assert a.output_encoder.decode(ours[0, 1:].argmax(-1).tolist()) == decoded


@pytest.mark.parametrize("name", NAMES)
def test_only_the_compiled_components_have_weights(compiled, name):
    prog = compiled[name]
    model = to_lens(prog)
    used = {c.name for c in prog.components}
    for layer, block in enumerate(model.blocks):
        for head in range(model.cfg.n_heads):
            assert (block.attn.W_O[head].abs().sum() > 0) == (f"{layer}.{head}" in used), (layer, head)
        assert (block.mlp.W_out.abs().sum() > 0) == (f"blocks.{layer}.mlp" in used), layer


@pytest.mark.parametrize("name", NAMES)
def test_compiled_circuit_explains_the_behaviour_and_each_path_is_necessary(compiled, name):
    result = score_program(compiled[name], n_pairs=128, n_boot=50)
    rows, metrics = result["rows"], list(result["rows"]["compiled circuit"])
    assert result["informative"], name
    for m in metrics:
        assert rows["compiled circuit"][m]["ate"] > 0.05  # the pairs differ in behaviour
        assert rows["compiled circuit"][m]["explained"] >= 0.99
        assert rows["informative paths"][m]["explained"] >= 0.99
        assert rows["everything but the informative paths"][m]["explained"] <= 0.01
    for path in result["informative"]:  # each informative path is necessary: clearly less without it
        assert rows[f"without {path}"]["sq"]["explained"] <= 0.9, path


def test_circuit_of_sort_unique_is_the_compiled_one(compiled):
    # target_pos = SelectorWidth(Select(tokens, tokens, LT)) in head 0.0 + MLP 0, then Aggregate(Select(target_pos,
    # indices, EQ), tokens) in head 1.0: tokens reach 1.0's key through both of 0.0's q and k, and 1.0's value
    from probegen.patching.tracr_port import circuit_paths
    assert circuit_paths(compiled["sort_unique"], informative=True) == [
        "embed -> 0.0.k -> blocks.0.mlp -> 1.0.k -> unembed",
        "embed -> 0.0.q -> blocks.0.mlp -> 1.0.k -> unembed",
        "embed -> 1.0.v -> unembed"]


def test_unknown_program_is_one_clear_error():
    with pytest.raises(ProbegenError, match="tracr program 'nope': unknown \\(known: hist, sort_unique"):
        compile_program("nope")
    assert set(NAMES) == set(programs())
