"""torch.compile: a training step, prefill, decode and generate() compiled equal eager, and the fixed-shape decode
step (a StaticCache) is one graph at every context length.

Inductor on a CPU takes tens of seconds per graph, so most of its checks are `slow`; the default suite traces the
same code with TRACED (dynamo, AOT autograd with inductor's decompositions and partitioner, the custom op's autograd
included, but no code generation), which is where graph breaks and recompiles come from, and compiles the
fixed-shape decode step with inductor once.
"""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache, StaticCache

from hf_llama_mem import memory_ops

from .helpers import assert_close, tiny_model

# Plain "aot_eager" runs the traced graph with the strides of the fake tensors it traced, and torch's stride rule for
# softplus_backward differs from its kernel's (a view of the decay's gradient then fails); inductor's decompositions,
# which this backend applies too, do not have that op.
TRACED = "aot_eager_decomp_partition"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: what one test compiled does not count, nor stand in, for another's."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def chunk_major_inputs():
    """Inputs of the chunked rule's op as `chunk_gated_delta_rule` makes them: B 2, H 2, 3 chunks of 4, 2 query
    heads per memory head, K = V = 5, in float64."""
    shape = (2, 2, 3)
    k = torch.nn.functional.normalize(torch.randn(*shape, 4, 5, dtype=torch.float64), dim=-1)
    inputs = (
        torch.randn(*shape, 8, 5, dtype=torch.float64),  # q: rows (group, position)
        k,
        torch.randn(*shape, 4, 5, dtype=torch.float64),  # v
        -torch.rand(*shape, 4, dtype=torch.float64),  # g
        torch.rand(*shape, 4, dtype=torch.float64),  # beta
        torch.randn(2, 2, 5, 5, dtype=torch.float64),  # start state
    )
    return tuple(x.requires_grad_() for x in inputs)


def test_the_chunked_rule_op_passes_opcheck_and_equals_the_autograd_function():
    """The op the compiler sees: its fake shapes, its autograd and its dispatch under AOT checked by torch's own
    opcheck, and its outputs and gradients those of the eager autograd.Function."""
    inputs = chunk_major_inputs()
    results = torch.library.opcheck(memory_ops._chunked_rule_op, inputs)
    assert set(results.values()) == {"SUCCESS"}, results
    op_out = memory_ops._chunked_rule_op(*inputs)[:2]
    eager_out = memory_ops._ChunkedRule.apply(*inputs)
    weights = [torch.randn_like(out) for out in eager_out]
    op_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(op_out, weights, strict=True)), inputs)
    eager_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(eager_out, weights, strict=True)), inputs)
    for got, expected in zip((*op_out, *op_grads), (*eager_out, *eager_grads), strict=True):
        assert torch.equal(got, expected)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled since the test began (every recompile and every graph break adds one)."""
    return counters["stats"]["unique_graphs"]


def training_step(model, ids):
    """Loss and the gradient of every parameter of one training step."""
    model.train()
    loss = model(ids, labels=ids).loss
    parameters = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, parameters)


def assert_same_step(compiled, eager, what):
    (loss, grads), (expected_loss, expected_grads) = compiled, eager
    assert_close(loss, expected_loss, 1e-5, f"{what}: loss")
    for index, (got, expected) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(got, expected, 1e-5, f"{what}: gradient {index}")


def test_a_training_step_traces_as_one_graph_and_equals_eager():
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 40))  # several memory chunks and windows
    compiled = torch.compile(model, backend=TRACED, fullgraph=True)
    assert_same_step(training_step(compiled, ids), training_step(model, ids), TRACED)
    assert graphs_compiled() == 1


def test_a_packed_batch_is_still_refused_inside_the_graph():
    """position_ids restarting inside a row (a padding-free packed batch): under compile the refusal is an assertion
    in the graph (no graph break under fullgraph), and a batch that is not packed passes it."""
    model = tiny_model().train()
    ids = torch.randint(1, 256, (2, 40))
    compiled = torch.compile(model, backend=TRACED, fullgraph=True)
    compiled(ids, position_ids=torch.arange(40)[None], labels=ids)
    packed = torch.cat([torch.arange(20), torch.arange(20)])[None]
    with pytest.raises(RuntimeError, match="position_ids do not increase by one: packed sequences"):
        compiled(ids, position_ids=packed, labels=ids)


def decode_logits(model, ids, cache, prompt_length):
    """Prefill logits of the first `prompt_length` tokens, then one decode step per remaining token."""
    with torch.no_grad():
        logits = [model(ids[:, :prompt_length], cache=cache, use_cache=True).logits]
        for t in range(prompt_length, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


class RecordingBackend:
    """A TRACED backend that keeps every graph dynamo hands it."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return lookup_backend(TRACED)(graph_module, example_inputs)

    def host_reads(self) -> list[str]:
        """Calls that read a tensor's value back to the host (a sync per step, and no CUDA graph of the step)."""
        reads = ("item", "tolist", "_local_scalar_dense")
        return [node.format_node() for g in self.graphs for node in g.graph.nodes if str(node.target) in reads]


@pytest.mark.parametrize("cache_class", [DynamicCache, StaticCache])
def test_prefill_and_decode_trace_and_equal_eager(cache_class):
    """A compiled forward over a cache: the prefill, then decode steps from inside the first window to past the
    third. The fixed-shape cache's decode step is one graph at every context length, without a host read; the
    dynamic cache's window grows until it is full, so its steps recompile, but give the same logits."""
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 30))
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    expected = decode_logits(model, ids, DynamicCache(config=model.config), 3)
    assert_close(decode_logits(compiled, ids, make_cache(cache_class, model), 3), expected, 1e-5, "compiled")
    if cache_class is StaticCache:
        assert graphs_compiled() == 2  # the prefill, and one decode step for every length
        assert not backend.host_reads()


def make_cache(cache_class, model):
    return cache_class(config=model.config, max_cache_len=64) if cache_class is StaticCache else cache_class()


def generate_kwargs(model, prompt):
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0  # a left-padded row
    return dict(
        attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True
    )


def compile_config(backend):
    # generate()'s default mode, "reduce-overhead" (CUDA graphs where there is CUDA), is an inductor option.
    config = CompileConfig(backend=backend, fullgraph=True, **({} if backend == "inductor" else dict(mode=None)))
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told (transformers' flag)
    return config


def assert_same_generation(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        assert_close(a, b, 1e-5, f"logits of step {step}")


def test_a_static_cache_implementation_compiles_the_decode_step_once():
    """generate(cache_implementation="static", compile_config=...): the decode steps of a left-padded batch run one
    compiled graph (no recompile as the context grows, no graph break under fullgraph), token for token eager
    greedy decoding's."""
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 12))
    kwargs = generate_kwargs(model, prompt)
    expected = model.generate(prompt, **kwargs)
    got = model.generate(prompt, cache_implementation="static", compile_config=compile_config(TRACED), **kwargs)
    assert_same_generation(got, expected)
    assert graphs_compiled() == 1


def test_inductor_compiles_the_static_decode_step_and_decodes_what_eager_decodes():
    """The real compiler on the decode step (inductor's CPU code: about half a minute for the tiny model)."""
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 12))
    kwargs = generate_kwargs(model, prompt)
    expected = model.generate(prompt, **kwargs)
    assert_same_generation(
        model.generate(prompt, cache_implementation="static", compile_config=compile_config("inductor"), **kwargs),
        expected,
    )


@pytest.mark.slow
def test_inductor_training_step_equals_eager():
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 40))
    assert_same_step(training_step(torch.compile(model), ids), training_step(model, ids), "inductor")


@pytest.mark.slow
def test_inductor_compiled_module_generates_what_eager_generates():
    """`model.compile()` (torch.compile in place, so that generate()'s forward calls are compiled) with the default
    dynamic cache: prefill and decode logits, token for token."""
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 12))
    kwargs = generate_kwargs(model, prompt)
    expected = model.generate(prompt, **kwargs)
    model.compile()
    assert_same_generation(model.generate(prompt, **kwargs), expected)


@pytest.mark.gpu
def test_cuda_graphs_of_the_static_decode_step_decode_what_eager_decodes():
    """On CUDA, cache_implementation="static" makes generate() compile the decode step with its default
    mode="reduce-overhead": CUDA graphs, which need the step free of host syncs and its cache tensors at fixed
    addresses. Greedy decoding equals eager's token for token, and no graph was skipped."""
    model = tiny_model().cuda()
    prompt = torch.randint(1, 256, (2, 12), device="cuda")
    kwargs = generate_kwargs(model, prompt)
    expected = model.generate(prompt, **kwargs)
    counters.clear()
    got = model.generate(prompt, cache_implementation="static", **kwargs)
    assert_same_generation(got, expected)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    again = model.generate(prompt, cache_implementation="static", **kwargs)  # replays the recorded graphs
    assert_same_generation(again, expected)
