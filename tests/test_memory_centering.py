"""Calibrating the memory's centring offsets (config.memory_centering; how every path applies them is in
test_memory_projection.py): `calibrate_centering` centres the keys and queries on the text it is given, and `extend`
calibrates a conversion's offsets and records the setting in its delta."""

import pytest
import torch

from hf_llama_mem import LlamaMemForCausalLM
from hf_llama_mem.extend import (
    ExtendSettings,
    apply_delta,
    calibrate_centering,
    delta_conversion,
    extend,
    read_delta_metadata,
)

from .helpers import tiny_model
from .test_extend import SETTINGS, one_thread, source  # noqa: F401 (fixtures)
from .test_memory_projection import OFFSETS, with_random


def test_calibration_centres_the_memory_keys_and_queries_on_its_text():
    """Exactly, with the gates closed (as after a conversion): then no layer's statistics depend on the reads."""
    model = with_random(tiny_model(memory_centering=True, memory_projection_rank=2), OFFSETS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".memory.gate"):
                param.zero_()
    ids = torch.randint(1, 256, (1, 80))
    keys, queries = {}, {}
    for index, layer in enumerate(model.model.layers):
        memory = layer.self_attn.memory
        memory.key_conv.register_forward_hook(lambda m, args, out, i=index: keys.__setitem__(i, out))

        def read_query(m, args, out, i=index):  # the read's query with its correction, before the offset
            if args[0] == "read":
                queries[i] = args[2] + m.query_correction(args[1])

        memory.register_forward_hook(read_query)
    calibrate_centering(model, ids)
    with torch.no_grad():
        model(ids, use_cache=False)
    for index, layer in enumerate(model.model.layers):
        memory = layer.self_attn.memory
        key = keys[index].view(1, *memory.key_offset.shape, -1) + memory.key_offset[None, :, :, None]
        query = queries[index] + memory.query_offset[None, :, None]
        assert key.mean(dim=(0, 3)).abs().max() < 1e-5 and query.mean(dim=(0, 2)).abs().max() < 1e-5
        assert memory.key_offset.abs().max() > 1e-3  # the text's keys were not centred before
    with pytest.raises(ValueError, match="memory_centering=True"):
        calibrate_centering(tiny_model(), ids)


def test_extend_calibrates_a_conversion_and_records_the_setting(source, tmp_path):  # noqa: F811
    delta = extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "steps": 1, "memory_centering": True}))
    assert read_delta_metadata(delta)["memory_centering"] is True
    conversion = delta_conversion(delta)
    assert conversion["memory_centering"] is True
    model = LlamaMemForCausalLM.from_llama(source, **conversion)
    apply_delta(model, delta)
    offsets = [p for n, p in model.named_parameters() if n.endswith(OFFSETS)]
    assert offsets and all(p.abs().max() > 0 for p in offsets)


def test_a_later_stage_converts_as_the_delta_it_starts_from(source, tmp_path):  # noqa: F811
    """The recipe centres by default; a stage that starts from an uncentred delta converts without centring."""
    first = extend(source, tmp_path / "first", ExtendSettings(**{**SETTINGS, "steps": 1, "memory_centering": False}))
    second = extend(source, tmp_path / "second", ExtendSettings(**{**SETTINGS, "steps": 1, "init_delta": str(first)}))
    assert read_delta_metadata(first)["memory_centering"] is False
    assert read_delta_metadata(second)["memory_centering"] is False
    assert ExtendSettings().memory_centering is None  # the default comes from DEFAULT_CONVERSION (True)
