"""The diffusers backend on whole Flux, SDXL and Z-Image pipelines (tiny configs, built here, saved,
loaded back from the directory offline), with LoRAs composed by module name.

Nothing is downloaded: the text encoders are built from configs and the tokenizer is the
tiny backend's in-process BPE. Each pipeline renders; a LoRA changes the image; back to
the base gives the base image's bytes; A -> B -> A gives A's bytes.
"""
from __future__ import annotations


import pytest
import torch

from lora_core import load_adapter
from testsupport import lora as T
from workers.backends import make_backend
from workers.backends.base import RenderRequest
from workers.backends.tiny import _init_weights, _train_tokenizer
from workers.wrapper import ComposedModel
from workers.worker import png_bytes as png  # the farm's own encoder: the bytes it writes

REQ = RenderRequest("a red fox in the snow", seed=3, steps=2, width=64, height=64, guidance=1.0)


def _tokenizer(max_length: int):
    tok = _train_tokenizer()
    tok.model_max_length = max_length
    return tok


def _clip_config(vocab: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=vocab,
                          hidden_act="gelu", projection_dim=32, max_position_embeddings=77)


def _seeded(*parts):
    for i, p in enumerate(parts):
        _init_weights(p, torch.Generator().manual_seed(100 + i))
        p.eval()


def build_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = _tokenizer(77), _tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        text_encoder = CLIPTextModel(_clip_config(len(tok)))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, decoder_start_token_id=0))
        vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035)
    _seeded(transformer, text_encoder, text_encoder_2, vae)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok2, vae=vae, transformer=transformer)


def build_sdxl():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok, tok2 = _tokenizer(77), _tokenizer(77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                    norm_num_groups=1)
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            latent_channels=4, sample_size=128, norm_num_groups=1)
        text_encoder = CLIPTextModel(_clip_config(len(tok)))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tok2)))
    _seeded(unet, vae, text_encoder, text_encoder_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler)


def build_zimage():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = _tokenizer(512)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                               n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                               cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=16, max_position_embeddings=1024))
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            latent_channels=4, sample_size=64, norm_num_groups=1, shift_factor=0.0, scaling_factor=1.0)
    _seeded(transformer, text_encoder, vae)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=tok, transformer=transformer)


BUILD = {"flux": build_flux, "sdxl": build_sdxl, "zimage": build_zimage}
DENOISER = {"flux": "FluxTransformer2DModel", "sdxl": "UNet2DConditionModel", "zimage": "ZImageTransformer2DModel"}



@pytest.fixture(scope="module", params=sorted(BUILD))
def loaded(request, tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp(request.param)
    BUILD[request.param]().save_pretrained(d, safe_serialization=True)
    return request.param, make_backend({"backend": "diffusers", "path": str(d)}, device="cpu")


def _lora(model: torch.nn.Module, kind: str, seed: int, tmp_path):
    """Flux: a PEFT file on attention + MLP; SDXL: kohya underscored names on the UNet's
    attention; Z-Image: ``diffusion_model.``-prefixed names on the main layers."""
    include = {"flux": ("attn.", "ff."), "sdxl": ("attn1.", "attn2."), "zimage": ("layers.",)}[kind]
    layers = T.random_layers(T.linear_shapes(model, include), rank=4, seed=seed, scale=0.5)
    sd = {"flux": lambda: T.peft_state_dict(layers), "sdxl": lambda: T.kohya_state_dict(layers, prefix="lora_unet_"),
          "zimage": lambda: T.peft_state_dict(layers, prefix="diffusion_model.")}[kind]()
    return load_adapter(T.write_safetensors(tmp_path / f"{kind}-{seed}.safetensors", sd))


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_pipeline_renders_and_switches_exactly(loaded, tmp_path, mode):
    kind, backend = loaded
    assert type(backend.transformer).__name__ == DENOISER[kind]
    m = ComposedModel(backend, lora_mode=mode)
    base = png(backend.render([REQ])[0])
    assert png(backend.render([REQ])[0]) == base, "same request, same bytes"
    a, b = _lora(backend.transformer, kind, 1, tmp_path), _lora(backend.transformer, kind, 2, tmp_path)

    def render(pairs):
        m.want(pairs)
        m.ensure()
        return png(backend.render([REQ])[0])

    with_a = render([(a, 1.0)])
    assert with_a != base, "the LoRA reaches the denoiser by module name"
    assert render([(b, 0.8)]) not in (base, with_a)
    assert render([(a, 1.0)]) == with_a, "A -> B -> A"
    assert render([]) == base, "base after LoRAs, bit for bit"
