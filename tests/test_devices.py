"""The device/precision decisions, as a table, and the out-of-memory ladder's order."""
from dataclasses import replace

import pytest
import torch

from engine.devices import Hardware, plan_for
from engine.errors import RequestError
from engine.families import FAMILIES, Family

CPU = Hardware(physical_cores=4)
CPU_BF16 = Hardware(cpu_bf16=True, physical_cores=4)
CUDA = Hardware(cuda=True, cuda_name="NVIDIA GeForce RTX 3060", cuda_vram_gb=12, cuda_bf16=True, physical_cores=8)
CUDA_1660 = Hardware(cuda=True, cuda_name="NVIDIA GeForce GTX 1660", cuda_vram_gb=6, physical_cores=4)
MPS = Hardware(mps=True, physical_cores=8)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# hardware, family, device, precision -> device, unet, text encoder, vae, upcast attention
TABLE = [
    (CPU, Family.SD1, "auto", "auto", "cpu", F32, F32, F32, False),
    (CPU_BF16, Family.SD1, "auto", "auto", "cpu", BF16, F32, F32, False),
    (CPU, Family.SD1, "auto", "fp16", "cpu", F32, F32, F32, False),       # fp16 never on a CPU
    (CPU_BF16, Family.SD2_V, "auto", "fp16", "cpu", BF16, F32, F32, False),
    (CPU_BF16, Family.SD1, "auto", "fp32", "cpu", F32, F32, F32, False),  # the user's word wins
    (CUDA, Family.SD1, "auto", "auto", "cuda", F16, F16, F16, False),
    (CUDA, Family.SD2_V, "auto", "auto", "cuda", F16, F16, F16, True),    # SD 2.x: attention upcast
    (CUDA, Family.SDXL, "auto", "auto", "cuda", F16, F16, F32, False),    # SDXL's VAE overflows fp16
    (CUDA, Family.SDXL, "auto", "bf16", "cuda", BF16, BF16, BF16, False),
    (CUDA, Family.SD1, "cpu", "auto", "cpu", F32, F32, F32, False),       # --device cpu
    (CUDA_1660, Family.SD1, "auto", "auto", "cuda", F32, F32, F32, False),  # GTX 16xx: black images in fp16
    (CUDA_1660, Family.SD1, "auto", "bf16", "cuda", F16, F16, F16, False),  # no bf16 on Turing
    (MPS, Family.SD1, "auto", "auto", "mps", F16, F16, F32, False),
    (MPS, Family.SD2, "auto", "auto", "mps", F16, F16, F32, True),
]


@pytest.mark.parametrize("hw,family,device,precision,dev,unet,te,vae,upcast", TABLE)
def test_plan_table(hw, family, device, precision, dev, unet, te, vae, upcast):
    plan = plan_for(FAMILIES[family], hw, device, precision)
    assert (plan.device, plan.unet_dtype, plan.text_encoder_dtype, plan.vae_dtype, plan.upcast_attention) == \
        (dev, unet, te, vae, upcast)


def test_fp16_is_never_planned_on_cpu_for_any_family():
    for family in FAMILIES.values():
        for hw in (CPU, CPU_BF16):
            for precision in ("auto", "fp32", "fp16", "bf16"):
                plan = plan_for(family, hw, "cpu", precision)
                assert torch.float16 not in (plan.unet_dtype, plan.text_encoder_dtype, plan.vae_dtype)


def test_cpu_plan_uses_physical_cores():
    assert plan_for(FAMILIES[Family.SD1], CPU).threads == 4


def test_missing_cuda_is_a_clear_error():
    with pytest.raises(RequestError, match="device: cuda was asked for"):
        plan_for(FAMILIES[Family.SD1], CPU, "cuda")


def test_unknown_precision_names_the_allowed_values():
    with pytest.raises(RequestError, match="precision: must be one of auto, fp32, fp16, bf16"):
        plan_for(FAMILIES[Family.SD1], CPU, "auto", "int4")


def test_oom_ladder_on_cuda_goes_slicing_offload_cpu_then_stops():
    family = FAMILIES[Family.SD1]
    plan = plan_for(family, CUDA)
    rungs = []
    while plan is not None:
        rungs.append((plan.rung, plan.device, plan.attention_slicing, plan.cpu_offload))
        plan = plan.step_down(CUDA, family)
    assert rungs == [("full", "cuda", False, False), ("sliced", "cuda", True, False),
                     ("offload", "cuda", True, True), ("cpu", "cpu", False, False)]


def test_oom_ladder_on_mps_skips_offload():
    family = FAMILIES[Family.SD1]
    sliced = plan_for(family, MPS).step_down(MPS, family)
    assert sliced.rung == "sliced"
    last = sliced.step_down(MPS, family)
    assert last.device == "cpu" and last.unet_dtype == torch.float32
    assert "running on the CPU" in last.notes[-1]


def test_fp32_vae_fix_keeps_the_rest_of_the_plan():
    plan = plan_for(FAMILIES[Family.SD1], CUDA)
    fixed = plan.with_fp32_vae()
    assert fixed.vae_dtype == torch.float32 and fixed.unet_dtype == torch.float16


def test_cpu_plan_keeps_the_default_layout():
    # Measured: channels-last was not faster on the 2-core CPU and raised peak RSS by 2.4 GB.
    for hw in (CPU, CPU_BF16):
        plan = plan_for(FAMILIES[Family.SD1], hw)
        assert not plan.channels_last and "channels-last" not in plan.describe()


def test_gpu_plans_keep_the_default_layout():
    assert not plan_for(FAMILIES[Family.SD1], CUDA).channels_last
    assert not plan_for(FAMILIES[Family.SD1], MPS).channels_last


def test_channels_last_is_described_when_set():
    assert "channels-last" in replace(plan_for(FAMILIES[Family.SD1], CPU), channels_last=True).describe()


@pytest.fixture(scope="module")
def tiny_pipe():
    from engine.tiny import tiny_sd1_pipeline

    return tiny_sd1_pipeline()


def _conv_layouts(module):
    return {m.weight.is_contiguous(memory_format=torch.channels_last) for m in module.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)}


def test_place_applies_and_undoes_channels_last(tiny_pipe):
    from engine.manager import place

    threads = torch.get_num_threads()
    try:
        cpu_plan = replace(plan_for(FAMILIES[Family.SD1], Hardware(physical_cores=threads)), channels_last=True)
        place(tiny_pipe, cpu_plan)
        assert _conv_layouts(tiny_pipe.unet) == {True} and _conv_layouts(tiny_pipe.vae) == {True}
        place(tiny_pipe, replace(cpu_plan, channels_last=False))
        assert _conv_layouts(tiny_pipe.unet) == {False} and _conv_layouts(tiny_pipe.vae) == {False}
    finally:
        torch.set_num_threads(threads)


def test_channels_last_unet_gives_the_same_output(tiny_pipe):
    from engine.manager import place

    threads = torch.get_num_threads()
    cpu_plan = replace(plan_for(FAMILIES[Family.SD1], Hardware(physical_cores=threads)), channels_last=True)
    unet = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.inference_mode():
        place(tiny_pipe, replace(cpu_plan, channels_last=False))
        nchw = unet(sample, 10, encoder_hidden_states=context).sample
        place(tiny_pipe, cpu_plan)
        nhwc = unet(sample, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-5)


def test_weights_load_in_the_plans_dtype_when_all_parts_share_it():
    assert plan_for(FAMILIES[Family.SD1], CUDA).load_dtype == torch.float16
    assert plan_for(FAMILIES[Family.SDXL], CUDA).load_dtype == torch.float32  # fp32 VAE: cast per part
    assert plan_for(FAMILIES[Family.SD1], CPU).load_dtype == torch.float32


# --- the GPU plan's parts that also run on a CPU, applied to the tiny model ---------------------

@pytest.fixture(scope="module")
def own_engine(tiny_models_dir, tmp_path_factory, plain_cpu):
    """An engine of this module's own: the plans applied here are not undone on the shared one."""
    from tests.conftest import loaded_engine

    return loaded_engine(tiny_models_dir, tmp_path_factory.mktemp("devices-engine"), plain_cpu)


def image(engine) -> "np.ndarray":
    import numpy as np

    request = engine.make_request({"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 48, "seed": 5,
                                   "save_images": False})
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def on_cpu(gpu_plan):
    """The same plan with its device forced to the CPU (in fp32: the CPU has no fp16 convolutions)."""
    return replace(gpu_plan, device="cpu", unet_dtype=F32, text_encoder_dtype=F32, vae_dtype=F32)


def attention_modules(engine):
    from diffusers.models.attention_processor import Attention

    return [m for m in engine.manager.current.pipe.unet.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("family, upcast", [(Family.SD2, True), (Family.SD2_V, True), (Family.SD1, False),
                                            (Family.SDXL, False)])
def test_cuda_half_precision_plan_upcasts_attention_for_sd2_only(family, upcast):
    plan = plan_for(FAMILIES[family], CUDA)
    assert plan.unet_dtype == F16
    assert plan.upcast_attention is upcast


def test_sd2_gpu_plans_upcast_applied_sets_upcast_softmax_and_still_generates(own_engine):
    import numpy as np

    gpu = plan_for(FAMILIES[Family.SD2], CUDA)
    modules = attention_modules(own_engine)
    assert modules and not any(m.upcast_softmax for m in modules)  # the tiny SD 1.x model as loaded
    reference = image(own_engine)
    own_engine.manager.replan(own_engine.manager.current, on_cpu(gpu))
    assert all(m.upcast_softmax and m.upcast_attention for m in attention_modules(own_engine))
    upcast = image(own_engine)
    assert upcast.std() > 5
    assert np.abs(upcast - reference).max() <= 1  # fp32 softmax of fp32 logits: the same image


def test_gpu_plans_first_out_of_memory_rung_runs_on_a_cpu(own_engine):
    import numpy as np

    gpu = plan_for(FAMILIES[Family.SD2], CUDA)
    sliced = gpu.step_down(CUDA, FAMILIES[Family.SD2])
    assert (sliced.attention_slicing, sliced.vae_tiling, sliced.upcast_attention) == (True, True, True)
    reference = image(own_engine)
    loaded = own_engine.manager.current
    own_engine.manager.replan(loaded, on_cpu(sliced))
    try:
        processors = {type(p).__name__ for p in loaded.pipe.unet.attn_processors.values()}
        assert processors == {"SlicedAttnProcessor"}  # the non-SDPA path, where upcast_softmax counts
        assert loaded.pipe.vae.use_tiling
        sliced_image = image(own_engine)
    finally:
        own_engine.manager.replan(loaded, on_cpu(gpu))
    assert sliced_image.std() > 5
    # The same picture: the tiny VAE's tiles are 32 px, so tiling blends seams into a 64x48 image
    # (measured: ~3.5 levels of 255 on average); another picture would differ by ~45.
    assert np.abs(sliced_image - reference).mean() < 10
