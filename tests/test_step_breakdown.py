"""benchmarks/step_breakdown.py: the parts it times, on tiny batches (the figures themselves are not checked)."""
import pytest

from helpers import benchmark_script


def _script():
    return benchmark_script("step_breakdown")


def test_official_block_parts_and_the_attention_linear_layers():
    r = _script().breakdown("cct_2_3x2_32", precision="fp32", batch_size=4, rounds=1, reps=1, kernels="fast",
                            recipe="fast")  # Muon's optimiser, the fast recipe's dropout rates
    assert r["recipe"] == "fast"
    parts = r["block_parts_ms"]
    assert {"pre_norm", "attn", "attn.qkv", "attn.proj", "attn without its linear layers", "norm1", "fc1", "act",
            "fc2", "residual adds, stochastic depth, rest"} <= set(parts)
    assert parts["attn.qkv"]["gflop_per_s"] > 0
    assert parts["attn without its linear layers"]["ms"] == pytest.approx(
        parts["attn"]["ms"] - parts["attn.qkv"]["ms"] - parts["attn.proj"]["ms"])
    children = [k for k in parts if "." not in k and "without" not in k]  # the rest is the block minus them
    assert sum(parts[k]["ms"] for k in children) == pytest.approx(r["block_ms"])
    assert set(r["step_ms"]) == {"step (measured)", "augmentation", "tokenizer (+ embedding)", "2 blocks",
                                 "head + loss", "optimiser (+ zeroed grads)"}


def test_a_module_called_twice_in_a_block_is_counted_twice(capsys):
    r = _script().main(["--model", "cct_2_3x2_32_keras", "--precision", "fp32", "--batch-size", "4",
                        "--rounds", "1", "--reps", "1"])
    assert r["block_parts_ms"]["act"]["calls"] == 2  # the Keras block's GELU after each Dense
    assert r["recipe"] == "keras"  # the model's own, as `cct train` picks it
    assert "act (x2" in capsys.readouterr().out


def test_timed_calls_write_gradients_afresh_as_a_step_does():
    """No call adds onto the previous call's gradients (a step drops them with zero_grad(set_to_none=True))."""
    import torch
    sb = _script()
    lin = torch.nn.Linear(8, 4)
    run = sb.forward_backward(lin, torch.randn(3, 8), "fp32", list(lin.parameters()))
    run()
    once = lin.weight.grad.clone()
    run()
    assert torch.equal(lin.weight.grad, once)


def test_linear_gflop_counts_the_forward_and_both_backward_products():
    import torch
    lin = torch.nn.Linear(256, 768)
    assert _script().linear_gflop(lin, torch.zeros(2, 10, 256)) == pytest.approx(3 * 2 * 20 * 256 * 768 / 1e9)


def test_stem_is_what_the_first_block_receives_with_a_class_token():
    import torch
    from cct import create_model
    sb = _script()
    net = create_model("vit_lite_2_4_32").eval()
    seen = {}

    def record(module, inputs):
        seen.setdefault("x", inputs[0])
    hook = net.blocks[0].register_forward_pre_hook(record)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)
        stem = sb._stem(net, x)
    hook.remove()
    assert stem.shape[1] == 65 and torch.equal(stem, seen["x"])
    assert not net.blocks[0]._forward_pre_hooks  # the stopping hook is gone


def test_text_models_are_refused_in_one_line():
    with pytest.raises(SystemExit, match="image models only"):
        _script().breakdown("text_cct_2", precision="fp32", batch_size=2, rounds=1, reps=1, kernels="fast")
