"""normkit.nn.ConditionalClassifier against the official CondNet head written out in plain PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from normkit.nn import ConditionalClassifier


def official_cls_seg(state, features, num_classes, with_bias):
    """CondNet's ConditionalDecodeHead.cls_seg (dropout excluded), from its published formulation:
    softmax + matmul class embeddings, kernel generation by a conv with groups = K, the generated
    parameters split as [K*C weights | K biases], classification by a conv with groups = B."""
    b, c, h, w = features.shape
    k = num_classes
    guidance = F.conv2d(features, state["guidance_project.conv.weight"], state["guidance_project.conv.bias"])
    prob = F.softmax(guidance, dim=1).reshape(b, k, -1)
    key = features.reshape(b, c, -1).permute(0, 2, 1).contiguous()
    embedding = torch.matmul(prob, key) * (h * w) ** -1
    params = F.conv2d(embedding.reshape(b, -1, 1, 1), state["filter_project.conv.weight"],
                      state["filter_project.conv.bias"], groups=k).reshape(b, -1)
    splits = torch.split(params, [k * c, k] if with_bias else [k * c], dim=1)
    weight = splits[0].reshape(b * k, -1, 1, 1)
    bias = splits[1].reshape(b * k) if with_bias else None
    out = F.conv2d(features.reshape(1, b * c, h, w), weight, bias, groups=b).reshape(b, k, h, w)
    return out, guidance


def random_state(module):
    # Random biases too (the module initialises them to zero), so the bias slicing is exercised.
    return {name: torch.randn_like(t) * 0.2 for name, t in module.state_dict().items()}


# (B, C, K, H, W): K not dividing C, C dividing K, K dividing C, H*W = 1, B = 1.
CASES = [(2, 6, 4, 5, 3), (3, 4, 8, 4, 4), (2, 9, 3, 3, 5), (2, 7, 5, 1, 1), (1, 5, 7, 6, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_official(device, case, with_bias, channels_last):
    b, c, k, h, w = case
    module = ConditionalClassifier(c, k, with_bias=with_bias, dropout=0.0).to(device=device, dtype=torch.float64)
    state = random_state(module)
    module.load_state_dict(state)
    features = torch.randn(b, c, h, w, dtype=torch.float64, device=device)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    features.requires_grad_()
    logits, guidance = module.train()(features)
    ref_features = features.detach().clone().requires_grad_()
    ref_state = {name: t.clone().requires_grad_() for name, t in state.items()}
    ref_logits, ref_guidance = official_cls_seg(ref_state, ref_features, k, with_bias)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(guidance, ref_guidance)

    grad_logits, grad_guidance = torch.randn_like(ref_logits), torch.randn_like(ref_guidance)
    torch.autograd.backward((logits, guidance), (grad_logits, grad_guidance))
    torch.autograd.backward((ref_logits, ref_guidance), (grad_logits, grad_guidance))
    torch.testing.assert_close(features.grad, ref_features.grad)
    params = dict(module.named_parameters())
    for name, ref_param in ref_state.items():
        torch.testing.assert_close(params[name].grad, ref_param.grad, msg=name)


def test_official_parameter_names_and_shapes():
    module = ConditionalClassifier(6, 4, with_bias=True)
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes == {"guidance_project.conv.weight": (4, 6, 1, 1), "guidance_project.conv.bias": (4,),
                      "filter_project.conv.weight": (4 * 6 + 4, 6, 1, 1), "filter_project.conv.bias": (4 * 6 + 4,)}
    no_bias = ConditionalClassifier(6, 4, with_bias=False)
    assert no_bias.state_dict()["filter_project.conv.weight"].shape == (24, 6, 1, 1)
    assert module.filter_project["conv"].groups == 4


def test_eval_returns_logits_and_dropout_applies_in_training():
    module = ConditionalClassifier(6, 4, dropout=0.5).double()
    module.load_state_dict(random_state(module))
    features = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    state = dict(module.state_dict())
    expected, _ = official_cls_seg(state, features, 4, True)
    torch.testing.assert_close(module.eval()(features), expected)

    torch.manual_seed(7)
    logits, guidance = module.train()(features)
    torch.manual_seed(7)
    dropped = F.dropout2d(features, 0.5, training=True)
    expected, expected_guidance = official_cls_seg(state, dropped, 4, True)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(guidance, expected_guidance)


def test_low_precision_close_to_fp32():
    module = ConditionalClassifier(16, 5)
    module.load_state_dict(random_state(module))
    features = torch.randn(2, 16, 8, 8)
    expected = module.eval()(features)
    got = module.to(torch.bfloat16)(features.to(torch.bfloat16))
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.1)


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients():
    module = ConditionalClassifier(6, 4)
    features = torch.randn(0, 6, 3, 5, requires_grad=True)
    logits, guidance = module.train()(features)
    assert logits.shape == (0, 4, 3, 5) and guidance.shape == (0, 4, 3, 5)
    (logits.sum() + guidance.sum()).backward()
    assert features.grad.shape == features.shape
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())
    assert module.eval()(features).shape == (0, 4, 3, 5)


def test_bad_input():
    module = ConditionalClassifier(6, 4)
    with pytest.raises(ValueError, match=r"expects Tensor\[B, 6, H, W\]"):
        module(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="dropout"):
        ConditionalClassifier(6, 4, dropout=1.0)
    with pytest.raises(ValueError, match="positive"):
        ConditionalClassifier(6, 0)


def test_autocast():
    module = ConditionalClassifier(16, 5).eval()
    module.load_state_dict(random_state(module))
    features = torch.randn(2, 16, 8, 8)
    expected = module(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(features)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.1)


def test_autocast_backward_matches_fp32_gradients():
    # The generator's backward gets a bf16 gradient for fp32 weights and embeddings: it must cast, and every
    # parameter gradient must keep its parameter's dtype and stay close to the fp32 one.
    module = ConditionalClassifier(16, 5, dropout=0.0).train()
    module.load_state_dict(random_state(module))
    features = torch.randn(2, 16, 8, 8)

    def grads(autocast: bool):
        module.zero_grad()
        x = features.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, guidance = module(x)
        (logits.float().square().mean() + guidance.float().mean()).backward()
        return {"features": x.grad, **{name: p.grad.clone() for name, p in module.named_parameters()}}

    expected, got = grads(False), grads(True)
    for name, grad in got.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, expected[name], rtol=0.1, atol=0.05 * expected[name].abs().max().item(),
                                   msg=name)
