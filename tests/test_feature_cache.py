"""Feature reuse ("fast" speed): what a reuse step skips, what it recomputes, and that it detaches."""
import pytest
import torch

from engine.feature_cache import FeatureReuse, skipped_parts
from engine.tiny import TEXT_HIDDEN, tiny_unet


def attention_last_unet():
    """SD 1.5's layout in small: the last up block has cross-attention after every resnet."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
    ).eval()


# The tiny SD1 UNet ends in a resnet-only up block (like SDXL); SD 1.5 ends in a cross-attention one.
LAYOUTS = {"ends-with-resnets": tiny_unet, "ends-with-attention": attention_last_unet}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def unet(request):
    return LAYOUTS[request.param]()


def inputs(seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, TEXT_HIDDEN, generator=g)


def call(unet, sample, context, t=500):
    with torch.inference_mode():
        return unet(sample, t, context).sample


def count_calls(module, calls: list, label: str):
    """A pre-hook that logs the label each time the module runs."""
    return module.register_forward_pre_hook(lambda m, args: calls.append(label))


def test_a_full_step_is_the_plain_unet(unet):
    x, c = inputs(0)
    reference = call(unet, x, c)
    with FeatureReuse(unet, interval=3):
        assert torch.equal(call(unet, x, c), reference)


def test_a_reuse_step_on_unchanged_input_gives_the_full_result(unet):
    """The remembered features are exactly what a full step would compute for the same input."""
    x, c = inputs(0)
    with FeatureReuse(unet, interval=3) as reuse:
        full = call(unet, x, c)
        reused = call(unet, x, c)
    assert (reuse.full_steps, reuse.reused_steps) == (1, 1)
    assert torch.equal(reused, full)


def test_a_reuse_step_skips_the_deep_blocks_and_reruns_the_last_layer(unet):
    # Count modules *inside* the skipped parts: torch's pre-hooks on a skipped part itself still fire.
    watched = {"mid": unet.mid_block.resnets[0], "deepest down": unet.down_blocks[-1].resnets[0],
               "first layer of the last block": unet.up_blocks[-1].resnets[0].conv1,
               "last layer": unet.up_blocks[-1].resnets[-1]}
    calls = []
    handles = [count_calls(m, calls, label) for label, m in watched.items()]
    x, c = inputs(0)
    try:
        with FeatureReuse(unet, interval=3):
            call(unet, x, c)
            assert sorted(calls) == sorted(watched)
            calls.clear()
            call(unet, x, c)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["last layer"]


def test_a_reuse_step_follows_its_new_input(unet):
    x, c = inputs(0)
    x2 = x + 0.5 * inputs(1)[0]
    with FeatureReuse(unet, interval=3):
        first = call(unet, x, c)
        second = call(unet, x2, c, t=480)
    exact_second = call(unet, x2, c, t=480)
    assert not torch.equal(second, first)
    assert not torch.equal(second, exact_second)  # an approximation, not the exact step
    # ...but a close one: nearer the exact step than the previous step's output is.
    assert (second - exact_second).norm() < (first - exact_second).norm()


def test_one_full_step_in_interval(unet):
    x, c = inputs(0)
    with FeatureReuse(unet, interval=3) as reuse:
        for _ in range(7):
            call(unet, x, c)
    assert (reuse.full_steps, reuse.reused_steps) == (3, 4)  # full at calls 0, 3 and 6


def test_a_new_batch_size_forces_a_full_step(unet):
    x, c = inputs(0)
    with FeatureReuse(unet, interval=3) as reuse:
        call(unet, x, c)
        single = call(unet, x[:1], c[:1])  # CFG turned off mid-run: the batch of 2 becomes 1
    assert (reuse.full_steps, reuse.reused_steps) == (2, 0)
    assert torch.equal(single, call(unet, x[:1], c[:1]))


def test_leaving_detaches_every_hook_and_forgets_the_features(unet):
    x, c = inputs(0)
    reference = call(unet, x, c)
    with FeatureReuse(unet, interval=3):
        call(unet, x, c)
    for module in (unet, *skipped_parts(unet)):
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks
    assert torch.equal(call(unet, x, c), reference)
    assert torch.equal(call(unet, x, c), reference)  # twice: no reuse step sneaks in after exit


def test_a_model_that_is_not_a_unet_is_refused():
    with pytest.raises(TypeError, match="diffusers UNet"):
        FeatureReuse(torch.nn.Linear(2, 2))


def test_interval_must_be_positive(unet):
    with pytest.raises(ValueError, match="interval"):
        FeatureReuse(unet, interval=0)
